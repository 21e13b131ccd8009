"""The failures a client is told about (errors.py): each one's HTTP status, its message kept as given,
and what /analyze answers when the code behind it raises one."""

from __future__ import annotations

import pytest

from clip_service import errors
from tests.support.images import image_bytes
from tests.support.responses import assert_error, upload

STATUSES = {
    errors.BadInput: 400, errors.Forbidden: 403, errors.NotFound: 404, errors.TooLarge: 413,
    errors.UpstreamFailed: 502, errors.NotReady: 503, errors.OutOfMemory: 503, errors.ShuttingDown: 503,
    errors.Overloaded: 503, errors.DeadlineExceeded: 504,
}


def test_every_failure_a_client_sees_has_a_status():
    defined = {value for value in vars(errors).values()
               if isinstance(value, type) and issubclass(value, errors.ServiceError)}
    assert defined - {errors.ServiceError} == set(STATUSES), "a new error needs its row here"
    assert errors.ServiceError.status == 500


@pytest.mark.parametrize("error, status", STATUSES.items(), ids=lambda value: getattr(value, "__name__", ""))
def test_analyze_answers_each_failure_with_its_status_and_message(client, monkeypatch, error, status):
    def failing(*args, **kwargs):
        raise error("CLIP_EXAMPLE=3 is wrong; set it to 4")

    monkeypatch.setattr("clip_service.http.analyze.parse_options", failing)
    response = upload(client, image_bytes())
    assert assert_error(response, status) == "CLIP_EXAMPLE=3 is wrong; set it to 4"
    assert ("Retry-After" in response.headers) == (status == 503)


def test_overloaded_says_when_to_retry():
    assert errors.Overloaded("busy").retry_after == 1
    assert errors.Overloaded("busy", retry_after=3).retry_after == 3
    assert errors.NotReady("loading").message == "loading"
