"""Failures a client can cause or must be told about, each with its HTTP status.

The Flask-free code raises these; http/errors.py turns them into the error JSON shape.
"""

import re

_SERVER_PATH = re.compile(r"(?<![\w.:/~-])(local-dir:)?/(?:[^\s/'\"()]+/)*([^\s/'\"(),;]+)")


def without_server_paths(message: str) -> str:
    """A load error as /health shows it: each server path by its last part only (the log has it all),
    as model names are shown: "/srv/clip/labels/animals.txt is not UTF-8" -> "animals.txt is not UTF-8"."""
    return _SERVER_PATH.sub(lambda found: (found.group(1) or "") + found.group(2), message)


class ServiceError(Exception):
    """A failure with a message that is safe to show to the client."""

    status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadInput(ServiceError):
    """Bad parameters, a malformed URL, or bytes that are not a supported image."""

    status = 400


class Forbidden(ServiceError):
    """A file path or URL target that the configuration does not allow."""

    status = 403


class NotFound(ServiceError):
    status = 404


class TooLarge(ServiceError):
    status = 413


class UpstreamFailed(ServiceError):
    """The URL could not be fetched."""

    status = 502


class NotReady(ServiceError):
    """The model is still loading, failed to load, or is failing on its device; retry later."""

    status = 503


class OutOfMemory(ServiceError):
    """The model's device ran out of memory even on this image alone; retry shortly."""

    status = 503


class ShuttingDown(ServiceError):
    """This worker is stopping and takes no new work; retry (another worker or instance answers)."""

    status = 503


class DeadlineExceeded(ServiceError):
    """The request took longer than REQUEST_TIMEOUT."""

    status = 504


class Overloaded(ServiceError):
    """MAX_QUEUE requests are already in progress in this worker (being fetched, decoded or encoded).

    Refused at once, before anything is read, so the client should retry shortly.
    """

    status = 503

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after
