"""The real server: CLIP.sh starts gunicorn, and requests talk to it over loopback."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import free_port
from test_routes import image_bytes

ROOT = Path(__file__).resolve().parent.parent


def start(env_overrides: dict, log_path: Path) -> subprocess.Popen:
    env = {key: value for key, value in os.environ.items() if not key.startswith(("CLIP_", "API_"))}
    env.update({"CLIP_ENV_FILE": "/nonexistent/.env", **env_overrides})
    log = log_path.open("wb")
    # From another working directory: CLIP.sh must find its own folder.
    return subprocess.Popen([str(ROOT / "CLIP.sh")], cwd="/", env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_healthy(port: int, process: subprocess.Popen, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the server exited during start-up"
        try:
            response = requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
            if response.status_code == 200:
                return response.json()
            assert response.json()["model_status"] == "loading"
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    raise AssertionError("the server did not become healthy")


def stop(process: subprocess.Popen) -> int:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    try:
        return process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        raise


@pytest.fixture
def server_env(settings, tmp_path, local_server):
    return {
        "PORT": str(free_port()), "PRIVATE": "True", "CLIP_MODEL": settings.clip_model,
        "CLIP_BACKEND": settings.backend,
        "CLIP_LABELS_DIR": str(settings.labels_dir), "CLIP_CACHE_DIR": str(tmp_path / "cache"),
        "EMOJI_DICTIONARY": str(settings.emoji_dictionary), "CLIP_CONFIDENCE_THRESHOLD": "0",
        "API_HOST": "127.0.0.1", "API_PORT": str(local_server.port), "API_TIMEOUT": "1",
        "URL_ALLOWLIST": "127.0.0.1", "ALLOWED_FILE_ROOTS": str(tmp_path), "WORKERS": "1",
        "THREADS": "4",
    }


def test_clip_sh_serves_all_three_inputs_and_drains_on_sigterm(server_env, tmp_path, local_server):
    local_server.routes["/emoji_mappings.json"] = (200, {}, '{"horse": "🏇"}'.encode())
    data = image_bytes("JPEG", (320, 240), (90, 160, 40))
    local_server.routes["/photo.jpg"] = (200, {"Content-Type": "image/jpeg"}, data)
    (tmp_path / "photo.jpg").write_bytes(data)
    port = server_env["PORT"]
    process = start(server_env, tmp_path / "first.log")
    try:
        health = wait_healthy(int(port), process)
        assert health["num_labels"] == 10 and health["model_status"] == "loaded"
        base = f"http://127.0.0.1:{port}/analyze"
        answers = [
            requests.post(base, files={"file": ("photo.jpg", data)}, timeout=30),
            requests.get(base, params={"file": str(tmp_path / "photo.jpg")}, timeout=30),
            requests.get(base, params={"url": local_server.url("/photo.jpg")}, timeout=30),
        ]
        for response in answers:
            assert response.status_code == 200, response.text
            assert response.json()["status"] == "success"
        predictions = answers[0].json()["predictions"]
        assert predictions == answers[1].json()["predictions"] == answers[2].json()["predictions"]
        emoji = {p["label"]: p.get("emoji") for p in predictions}
        assert emoji["horse"] == "🏇" and emoji["cat"] == "🐱"
        missing = requests.get(base, params={"file": str(tmp_path / "nope.jpg")}, timeout=10)
        assert missing.status_code == 404 and missing.json()["status"] == "error"
    finally:
        assert stop(process) == 0
    assert list((tmp_path / "cache").glob("label-features-*.safetensors"))

    second = start(server_env, tmp_path / "second.log")
    try:
        wait_healthy(int(port), second)
    finally:
        assert stop(second) == 0
    log = (tmp_path / "second.log").read_text()
    assert "Loaded 10 label features from" in log and "Encoding" not in log


@pytest.mark.parametrize("variable, value, expected", [
    ("PORT", "abc", "clip-service: PORT=abc is not an integer"),
    ("CLIP_MODEL", "ViT-B/33", "clip-service: CLIP_MODEL=ViT-B/33 is not a known model"),
    ("PRIVATE", "maybe", "clip-service: PRIVATE=maybe is not a boolean"),
])
def test_invalid_setting_stops_start_up_with_one_line(server_env, tmp_path, variable, value, expected):
    process = start({**server_env, variable: value}, tmp_path / "bad.log")
    assert process.wait(timeout=60) != 0
    lines = (tmp_path / "bad.log").read_text().strip().splitlines()
    assert lines[-1].startswith(expected)
    assert not any("Traceback" in line for line in lines)


def test_no_labels_stops_start_up(server_env, tmp_path):
    empty = tmp_path / "no-labels"
    empty.mkdir()
    process = start({**server_env, "CLIP_LABELS_DIR": str(empty)}, tmp_path / "nolabels.log")
    assert process.wait(timeout=60) != 0
    assert "No labels loaded" in (tmp_path / "nolabels.log").read_text()


def healthy_workers(base: str) -> int:
    """Workers whose model is loaded, from the per-process clip_healthy samples in /metrics."""
    text = requests.get(f"{base}/metrics", timeout=10).text
    return sum(1 for line in text.splitlines()
               if line.startswith("clip_healthy{") and float(line.rsplit(" ", 1)[1]) == 1.0)


def test_two_workers_share_metrics_and_reload_labels_on_sighup(server_env, tmp_path, settings):
    """Also the CPU's default engine under several workers: CLIP_BACKEND=auto picks OpenVINO, the two
    workers start together, one converts the model while the other waits for it, and both serve."""
    labels = tmp_path / "labels"
    labels.mkdir()
    (labels / "animals.txt").write_text("cat\ndog\n")
    env = {**server_env, "WORKERS": "2", "THREADS": "2", "CLIP_LABELS_DIR": str(labels),
           "CLIP_BACKEND": "auto"}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    process = start(env, tmp_path / "two.log")
    base = f"http://127.0.0.1:{env['PORT']}"
    try:
        wait_healthy(int(env["PORT"]), process)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and healthy_workers(base) < 2:  # not just the first one
            time.sleep(0.2)
        assert healthy_workers(base) == 2
        sent = 12
        for _ in range(sent):
            response = requests.post(f"{base}/analyze", files={"file": ("x.png", image_bytes())}, timeout=30)
            assert response.status_code == 200, response.text
        text = requests.get(f"{base}/metrics", timeout=10).text
        counted = sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                      if line.startswith("clip_requests_total{") and 'route="/analyze"' in line)
        assert counted == sent, "every worker's requests are counted once"
        version = requests.get(f"{base}/labels", timeout=10).json()["version"]
        (labels / "animals.txt").write_text("cat\ndog\nhorse\n")
        os.kill(process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        versions = set()
        while time.monotonic() < deadline:
            # both workers must answer with the new set; keep-alive off so requests spread
            versions = {requests.get(f"{base}/labels", timeout=10, headers={"Connection": "close"})
                        .json()["version"] for _ in range(6)}
            if version not in versions and len(versions) == 1:
                break
            time.sleep(0.2)
        assert version not in versions and len(versions) == 1
        assert requests.post(f"{base}/analyze", files={"file": ("x.png", image_bytes())},
                             timeout=30).status_code == 200
    finally:
        assert stop(process) == 0
    log = (tmp_path / "two.log").read_text()
    assert "Encoding 1 labels" in log, "a reload encodes only the new label"
    assert "Encoding 3 labels" not in log
    assert log.count("with openvino") == 2, "both workers run the CPU's default engine"
    assert log.count("Converting CLIP_MODEL=") == 1, "the model is converted once, not per worker"


def test_python_rest_py_serves_too(server_env, tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith(("CLIP_", "API_"))}
    env.update({"CLIP_ENV_FILE": "/nonexistent/.env", **server_env})
    log = (tmp_path / "rest.log").open("wb")
    process = subprocess.Popen([sys.executable, str(ROOT / "REST.py")], cwd="/",
                               env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_healthy(int(server_env["PORT"]), process)
        response = requests.post(f"http://127.0.0.1:{server_env['PORT']}/analyze?url=http://user:pw@x.test/",
                                 files={"file": ("x.png", image_bytes())}, timeout=30)
        assert response.status_code == 400 and "got url and upload" in response.json()["error"]["message"]
    finally:
        stop(process)
    assert "user:pw" not in (tmp_path / "rest.log").read_text()
