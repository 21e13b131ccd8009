"""/analyze, its drop-in aliases and /analyze/batch: parse the request, call the service, serialise.

The aliases are what the animal-farm orchestrator (ice9innovations/windmill) and its sibling services
call, answered exactly as /analyze answers: `/v3/analyze` is /analyze itself, `/v2/analyze?image_url=`
is `?url=`, `/v2/analyze_file?file_path=` is `?file=`. A POST may carry the image as a multipart field
`file` or as the whole body (Content-Type image/... or application/octet-stream).
"""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from clip_service import metrics
from clip_service.errors import BadInput, ServiceError
from clip_service.http.bodies import analyze_body, batch_body
from clip_service.http.current import admitted, current_service
from clip_service.http.errors import elapsed
from clip_service.http.logs import set_input_kind
from clip_service.http.options import parse_options, single_value

analyze_bp = Blueprint("analyze", __name__)

RAW_BODY_TYPES = ("image/", "application/octet-stream")


def _raw_body() -> bool:
    """A POST whose body is the image itself, as the sibling services accept it."""
    return request.mimetype.startswith(RAW_BODY_TYPES)


def uploads(most: int) -> list[bytes]:
    """The images of a POST: the multipart `file` fields (1 to `most`), or the raw body."""
    if _raw_body():
        return [request.get_data(cache=False)]
    if request.mimetype != "multipart/form-data":
        raise BadInput(f"POST {request.path} needs a multipart/form-data body with the image in a field "
                       "named file, or the image itself as the body (Content-Type image/jpeg or the like)")
    files = request.files.getlist("file")
    if not files:
        raise BadInput("The multipart body has no field named file; send the image as file=@photo.jpg")
    if len(files) > most:
        raise BadInput(f"Send at most {most} image{'s' if most > 1 else ''} in the file field"
                       f"{' (BATCH_FILES_MAX)' if most > 1 else ''}; {len(files)} were sent")
    return [upload.read() for upload in files]


def _analyze(url_name: str | None, file_name: str | None):
    """/analyze with the query names of the URL and server-file inputs (None: not taken here)."""
    service = current_service()
    with admitted() as deadline:
        url = single_value(request.args.getlist, url_name) if url_name else None
        path = single_value(request.args.getlist, file_name) if file_name else None
        upload = uploads(1)[0] if request.method == "POST" else None
        given = [name for name, value in (("url", url), ("file", path), ("upload", upload))
                 if value is not None]
        if len(given) != 1:
            ways = [f"?{name}=..." for name in (url_name, file_name) if name]
            if request.path in ("/analyze", "/v3/analyze"):
                ways.append("a POST upload in the field file (or as the body)")
            raise BadInput(f"Give exactly one input: {' or '.join(ways)}; "
                           f"got {' and '.join(given) if given else 'none'}")
        set_input_kind(given[0])
        service.ready_classifier()  # refuse before fetching anything when not ready
        options = parse_options(request.values.getlist, service.settings.confidence_threshold,
                                service.settings.max_predictions, service.known_groups())
        if url is not None:
            upload = service.images.url_bytes(url, deadline)
        elif path is not None:
            upload = service.images.file_bytes(path)
        [predictions] = service.classify([upload], deadline, options)
        if isinstance(predictions, ServiceError):
            raise predictions
    return jsonify(analyze_body(predictions, service.ready_classifier(), elapsed()))


@analyze_bp.route("/analyze", methods=["GET", "POST"])
def analyze():
    return _analyze("url", "file")


@analyze_bp.route("/v3/analyze", methods=["GET", "POST"])
def analyze_v3():
    return _analyze("url", "file")


@analyze_bp.get("/v2/analyze")
def analyze_v2():
    return _analyze("image_url", None)


@analyze_bp.get("/v2/analyze_file")
def analyze_file_v2():
    return _analyze(None, "file_path")


@analyze_bp.post("/analyze/batch")
def analyze_batch():
    service = current_service()
    with admitted() as deadline:
        if _raw_body():
            raise BadInput("POST /analyze/batch needs a multipart/form-data body with one field named "
                           "file per image")
        images = uploads(service.settings.batch_files_max)
        set_input_kind("upload")
        service.ready_classifier()
        options = parse_options(request.values.getlist, service.settings.confidence_threshold,
                                service.settings.max_predictions, service.known_groups())
        metrics.BATCH_REQUEST_FILES.observe(len(images))
        outcomes = service.classify(images, deadline, options)
    return jsonify(batch_body(outcomes, service.ready_classifier(), elapsed()))
