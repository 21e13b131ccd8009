"""HTTP routes: parse the request, call the service, serialise the answer. Nothing more."""

from __future__ import annotations

import logging
from dataclasses import asdict

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.exceptions import HTTPException

from clip_service import metrics
from clip_service.errors import BadInput, ServiceError
from clip_service.front_door import ARRIVED_KEY
from clip_service.logs import request_seconds, set_input_kind
from clip_service.options import parse_options, single_value
from clip_service.scoring import Prediction

log = logging.getLogger(__name__)

bp = Blueprint("clip", __name__)


def _service():
    return current_app.extensions["clip_service"]


def _elapsed() -> float:
    return round(request_seconds(), 3)


def prediction_json(prediction: Prediction) -> dict:
    body = asdict(prediction)
    if body["emoji"] is None:
        del body["emoji"]
    return body


def error_response(status: int, message: str):
    body = {"service": "clip", "status": "error", "predictions": [], "error": {"message": message},
            "metadata": {"processing_time": _elapsed()}}
    return jsonify(body), status


@bp.before_app_request
def _query_string_is_utf8():
    try:
        request.query_string.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput("The query string is not valid UTF-8; percent-encode the values "
                       "(e.g. curl -G --data-urlencode)") from None


@bp.get("/health")
def health():
    body = _service().health()
    return jsonify(body), 200 if body["status"] == "healthy" else 503


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


@bp.route("/analyze", methods=["GET", "POST"])
def analyze():
    service = _service()
    with service.admitted(request.environ.get(ARRIVED_KEY)) as deadline:
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
            image = service.image_from_url(url, deadline)
        elif path is not None:
            image = service.image_from_file(path)
        else:
            image = service.image_from_upload(upload)
        predictions = service.analyze(image, deadline, options)
    return jsonify({
        "service": "clip",
        "status": "success",
        "predictions": [prediction_json(p) for p in predictions],
        "metadata": {"processing_time": _elapsed(), "model_info": service.model_info()},
    })


@bp.get("/labels")
def labels():
    return jsonify({"service": "clip", "status": "success", **_service().labels_listing()})


@bp.get("/metrics")
def prometheus_metrics():
    body, content_type = metrics.exposition()
    return Response(body, content_type=content_type)


@bp.app_errorhandler(ServiceError)
def _service_error(error: ServiceError):
    response, status = error_response(error.status, error.message)
    if error.status == 503:
        response.headers["Retry-After"] = str(getattr(error, "retry_after", 5))
    response.headers.update(getattr(error, "headers", {}))
    return response, status


@bp.app_errorhandler(HTTPException)
def _http_error(error: HTTPException):
    response, status = error_response(error.code or 500, error.description or error.name)
    for name, value in error.get_headers():  # e.g. Allow on a 405
        if name.lower() != "content-type":
            response.headers[name] = value
    return response, status


@bp.app_errorhandler(Exception)
def _unexpected(error: Exception):
    log.exception("Unexpected error on %s %s", request.method, request.path)
    return error_response(500, "Internal error; the service log has the details")
