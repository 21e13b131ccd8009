"""The service as a drop-in for the animal-farm orchestrator: its own calls, to the server CLIP.sh starts.

ice9innovations/windmill's workers/base_worker.py calls its CLIP service like this: `post_image_bytes`
posts `files={'file': ('image.jpg', io.BytesIO(image_bytes), 'image/jpeg')}` to
`http://host:port/v3/analyze` with `timeout=REQUEST_TIMEOUT` (30) and stores the JSON (reading
`metadata.processing_time`); `check_service_health` trusts only `/health`'s status code (200: can serve,
anything else or no answer within 2 s: broken, and the worker stops). Its sibling services also take a
raw image body on /analyze, `/v2/analyze?image_url=` and `/v2/analyze_file?file_path=`.
"""

from __future__ import annotations

import contextlib
import io
import time

import numpy as np
import pytest
import requests

from clip_service.http.limits import MULTIPART_OVERHEAD
from tests.support.images import image_bytes
from tests.support.server import start, stop, wait_healthy

pytestmark = pytest.mark.system


def post_image_bytes(url: str, data: bytes, timeout: float = 30) -> requests.Response:
    """BaseWorker.post_image_bytes, call for call."""
    files = {"file": ("image.jpg", io.BytesIO(data), "image/jpeg")}
    return requests.post(url, files=files, timeout=timeout)


def check_service_health(host: str, port: int, timeout: float = 2) -> bool:
    """BaseWorker.check_service_health, call for call: the status code is all that counts."""
    try:
        response = requests.get(f"http://{host}:{port}/health", timeout=timeout)
        return response.status_code == 200
    except Exception:
        return False


def test_the_orchestrators_calls_through_clip_sh(server_env, tmp_path, local_server):
    env = {**server_env, "MAX_IMAGE_BYTES": "200000", "BATCH_FILES_MAX": "4"}
    data = image_bytes("JPEG", (640, 480), (40, 120, 200))
    (tmp_path / "photo.jpg").write_bytes(data)
    local_server.routes["/photo.jpg"] = (200, {"Content-Type": "image/jpeg"}, data)
    port = int(env["PORT"])
    base = f"http://127.0.0.1:{port}"
    process = start(env, tmp_path / "dropin.log")
    try:
        wait_healthy(port, process)
        assert check_service_health("127.0.0.1", port)
        response = post_image_bytes(f"{base}/v3/analyze", data)
        response.raise_for_status()
        result = response.json()
        assert (result["service"], result["status"]) == ("clip", "success")
        assert result["metadata"]["processing_time"] >= 0 and result["predictions"]
        expected = requests.post(f"{base}/analyze", files={"file": ("a.jpg", data)}, timeout=30).json()
        answers = [
            requests.post(f"{base}/analyze", data=data, headers={"Content-Type": "image/jpeg"}, timeout=30),
            requests.get(f"{base}/v2/analyze", params={"image_url": local_server.url("/photo.jpg")},
                         timeout=30),
            requests.get(f"{base}/v2/analyze_file", params={"file_path": str(tmp_path / "photo.jpg")},
                         timeout=30),
        ]
        for answer in answers:
            assert answer.status_code == 200, answer.text
            assert answer.json()["predictions"] == expected["predictions"] == result["predictions"]
        refused = post_image_bytes(f"{base}/v3/analyze", b"not a jpeg")
        assert refused.status_code == 400 and refused.json()["status"] == "error"
        assert check_service_health("127.0.0.1", port), "a bad image is not a broken service"

        # several images in one request, through the front door's larger limit for those routes
        big = [image_bytes("BMP", (170, 176), colour) for colour in ((200, 0, 0), (0, 200, 0), (0, 0, 200))]
        assert len(b"".join(big)) > 200_000 + MULTIPART_OVERHEAD
        batch = requests.post(f"{base}/analyze/batch", files=[("file", (f"{i}.bmp", d)) for i, d in
                                                              enumerate(big)], timeout=30)
        assert batch.status_code == 200, batch.text
        assert [item["status"] for item in batch.json()["results"]] == ["success"] * 3
        embedded = requests.post(f"{base}/embed", files=[("file", ("a.bmp", d)) for d in big], timeout=30)
        assert embedded.status_code == 200 and len(embedded.json()["embeddings"]) == 3
        texts = requests.post(f"{base}/embed", json={"texts": ["dog", "puppy"]}, timeout=30).json()
        vectors = np.array(texts["embeddings"])
        assert vectors.shape == (2, texts["metadata"]["model_info"]["dimensions"])
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
        # the door refuses what the app would, from the head alone
        too_big = requests.post(f"{base}/analyze", files={"file": ("x.bmp", b"".join(big))}, timeout=30)
        assert too_big.status_code == 413 and "(MAX_IMAGE_BYTES, plus form overhead)" in too_big.text
        huge = requests.post(f"{base}/analyze/batch", files=[("file", ("x.bmp", b"\0" * 250_000))] * 4,
                             timeout=30)
        assert huge.status_code == 413 and "BATCH_FILES_MAX times MAX_IMAGE_BYTES" in huge.text
        assert check_service_health("127.0.0.1", port)
    finally:
        assert stop(process) == 0


def test_a_broken_service_fails_the_orchestrators_health_check(server_env, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "open_clip_config.json").write_text('{"model_cfg": {"embed_dim": 8}}')
    (broken / "open_clip_model.safetensors").write_bytes(b"not weights")
    env = {**server_env, "CLIP_MODEL": f"local-dir:{broken}"}
    port = int(env["PORT"])
    process = start(env, tmp_path / "broken.log")
    try:
        deadline = time.monotonic() + 60
        body = {}
        while time.monotonic() < deadline and body.get("model_status") != "failed":
            with contextlib.suppress(requests.ConnectionError):
                body = requests.get(f"http://127.0.0.1:{port}/health", timeout=2).json()
            time.sleep(0.2)
        assert body.get("model_status") == "failed"
        assert not check_service_health("127.0.0.1", port)
        response = post_image_bytes(f"http://127.0.0.1:{port}/v3/analyze", image_bytes("JPEG"))
        assert response.status_code == 503 and response.json()["status"] == "error"
    finally:
        stopped = stop(process)
    assert stopped == 0, "a service whose model failed still stops cleanly"
    assert not check_service_health("127.0.0.1", port), "no answer at all is unhealthy too"
