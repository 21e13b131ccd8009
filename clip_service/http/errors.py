"""Every failure as the API's error JSON with its status, and the check every request gets first.

ServiceErrors carry their own status and a message safe for the client; werkzeug's HTTP errors keep
theirs (and headers such as Allow); anything unexpected is a logged 500 that shows no internals.
"""

from __future__ import annotations

import logging

from flask import Blueprint, jsonify, request
from werkzeug.exceptions import HTTPException

from clip_service.errors import BadInput, ServiceError
from clip_service.http.bodies import error_body
from clip_service.http.logs import request_seconds

log = logging.getLogger(__name__)

errors_bp = Blueprint("errors", __name__)


def elapsed() -> float:
    """The answers' processing_time: seconds since the request started, to the millisecond."""
    return round(request_seconds(), 3)


def error_response(status: int, message: str):
    # A message may quote the client's input, and JSON strings may carry lone surrogates ("\ud800")
    # that cannot be written as UTF-8: escape them, or the error answer itself would fail.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return jsonify(error_body(message, elapsed())), status


@errors_bp.before_app_request
def _query_string_is_utf8():
    try:
        request.query_string.decode("utf-8")
    except UnicodeDecodeError:
        raise BadInput("The query string is not valid UTF-8; percent-encode the values "
                       "(e.g. curl -G --data-urlencode)") from None


@errors_bp.app_errorhandler(ServiceError)
def _service_error(error: ServiceError):
    response, status = error_response(error.status, error.message)
    if error.status == 503:
        response.headers["Retry-After"] = str(getattr(error, "retry_after", 5))
    response.headers.update(getattr(error, "headers", {}))
    return response, status


@errors_bp.app_errorhandler(HTTPException)
def _http_error(error: HTTPException):
    response, status = error_response(error.code or 500, error.description or error.name)
    for name, value in error.get_headers():  # e.g. Allow on a 405
        if name.lower() != "content-type":
            response.headers[name] = value
    return response, status


@errors_bp.app_errorhandler(Exception)
def _unexpected(error: Exception):
    log.exception("Unexpected error on %s %s", request.method, request.path)
    return error_response(500, "Internal error; the service log has the details")
