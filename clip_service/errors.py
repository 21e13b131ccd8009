"""Failures a client can cause or must be told about, each with its HTTP status.

The Flask-free code raises these; the routes turn them into the error JSON shape.
"""


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
    status = 503


class DeadlineExceeded(ServiceError):
    """The request took longer than REQUEST_TIMEOUT."""

    status = 504


class Overloaded(ServiceError):
    """More requests are waiting in this worker than MAX_QUEUE; the client should retry."""

    status = 503

    def __init__(self, message: str, retry_after: int = 1):
        super().__init__(message)
        self.retry_after = retry_after
