"""/analyze: parse the request, call the service, serialise the answer. Nothing more."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from clip_service.errors import BadInput
from clip_service.http.bodies import analyze_body
from clip_service.http.errors import elapsed
from clip_service.http.front_door import ARRIVED_KEY
from clip_service.http.logs import set_input_kind
from clip_service.http.options import parse_options, single_value
from clip_service.service import ClipService

analyze_bp = Blueprint("analyze", __name__)


def _service() -> ClipService:
    return current_app.extensions["clip_service"]


def _upload() -> bytes | None:
    if request.method != "POST":
        return None
    if request.mimetype != "multipart/form-data":
        raise BadInput("POST /analyze needs a multipart/form-data body with the image in a field "
                       "named file")
    uploads = request.files.getlist("file")
    if len(uploads) > 1:
        raise BadInput(f"Send one image in the file field; {len(uploads)} were sent")
    if not uploads:
        raise BadInput("The multipart body has no field named file; send the image as file=@photo.jpg")
    return uploads[0].read()


@analyze_bp.route("/analyze", methods=["GET", "POST"])
def analyze():
    service = _service()
    with service.admission.admitted(request.environ.get(ARRIVED_KEY)) as deadline:
        url, path = single_value(request.args.getlist, "url"), single_value(request.args.getlist, "file")
        upload = _upload()
        given = [name for name, value in (("url", url), ("file", path), ("upload", upload))
                 if value is not None]
        if len(given) != 1:
            raise BadInput("Give exactly one input: ?url=..., ?file=... or a POST upload in the field "
                           f"file; got {' and '.join(given) if given else 'none'}")
        set_input_kind(given[0])
        service.ready_classifier()  # refuse before fetching anything when not ready
        options = parse_options(request.values.getlist, service.settings.confidence_threshold,
                                service.settings.max_predictions, service.known_groups())
        if url is not None:
            image = service.images.from_url(url, deadline)
        elif path is not None:
            image = service.images.from_file(path, deadline)
        else:
            image = service.images.from_upload(upload, deadline)
        predictions = service.analyze(image, deadline, options)
    return jsonify(analyze_body(predictions, service.ready_classifier(), elapsed()))
