"""The API's answer shapes, checked one way for every test: Flask's test client or a real HTTP answer.

assert_success and assert_error hold each answer to the whole contract (README, "Responses"): the
exact keys, the types, predictions sorted and rounded, and an error message that names the problem
without a traceback. Message fragments match case-sensitively, as a client reads them.
"""

from __future__ import annotations

import io

SUCCESS_KEYS = {"service", "status", "predictions", "metadata"}
ERROR_KEYS = {"service", "status", "predictions", "error", "metadata"}
MODEL_INFO_KEYS = {"framework", "model", "device", "labels_version"}
PREDICTION_KEYS = {"label", "confidence", "emoji"}


def _status_and_body(response) -> tuple[int, object, str]:
    """(status, the JSON body or None, the start of the raw body) of a Flask or a requests answer."""
    if hasattr(response, "get_json"):  # werkzeug's TestResponse
        return response.status_code, response.get_json(silent=True), response.get_data(as_text=True)[:300]
    try:
        body = response.json()
    except ValueError:
        body = None
    return response.status_code, body, response.text[:300]


def _content_type(response) -> str:
    return response.headers.get("Content-Type", "")


def assert_success(response) -> dict:
    """A 200 in the success shape; returns the body."""
    status, body, raw = _status_and_body(response)
    assert status == 200, (status, body or raw)
    assert _content_type(response).startswith("application/json"), _content_type(response)
    assert isinstance(body, dict) and set(body) == SUCCESS_KEYS, body
    assert (body["service"], body["status"]) == ("clip", "success")
    metadata = body["metadata"]
    assert set(metadata) == {"processing_time", "model_info"}, metadata
    assert isinstance(metadata["processing_time"], float) and metadata["processing_time"] >= 0
    assert set(metadata["model_info"]) == MODEL_INFO_KEYS, metadata["model_info"]
    assert metadata["model_info"]["framework"] == "OpenCLIP", "every test model is an open_clip local-dir:"
    predictions = body["predictions"]
    assert isinstance(predictions, list)
    for prediction in predictions:
        assert {"label", "confidence"} <= set(prediction) <= PREDICTION_KEYS, prediction
        assert isinstance(prediction["label"], str) and prediction["label"]
        assert isinstance(prediction.get("emoji", "x"), str) and prediction.get("emoji", "x")
    confidences = [p["confidence"] for p in predictions]
    assert all(isinstance(c, float) and 0 <= c <= 1 for c in confidences), confidences
    assert confidences == sorted(confidences, reverse=True)
    assert all(round(c, 3) == c for c in confidences)
    return body


def assert_error(response, status: int, *fragments: str) -> str:
    """`status` in the error shape, its message holding every fragment; returns the message."""
    actual, body, raw = _status_and_body(response)
    assert actual == status, (actual, body or raw)
    assert _content_type(response).startswith("application/json"), _content_type(response)
    assert isinstance(body, dict) and set(body) == ERROR_KEYS, body
    assert (body["service"], body["status"], body["predictions"]) == ("clip", "error", [])
    assert set(body["metadata"]) == {"processing_time"}, body["metadata"]
    assert isinstance(body["metadata"]["processing_time"], float) and body["metadata"]["processing_time"] >= 0
    assert set(body["error"]) == {"message"}, body["error"]
    message = body["error"]["message"]
    assert isinstance(message, str) and message and "Traceback" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def upload(client, data: bytes, name: str = "photo.png", field: str = "file"):
    """POST /analyze with `data` as a multipart upload, through Flask's test client."""
    return client.post("/analyze", data={field: (io.BytesIO(data), name)}, content_type="multipart/form-data")
