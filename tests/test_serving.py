"""The real server: CLIP.sh starts gunicorn, and requests talk to it over loopback."""

import os
import re
import signal
import sys
import threading
import time

import pytest
import requests

from tests.support.http_fixtures import free_port
from tests.support.images import image_bytes
from tests.support.server import ROOT, gunicorn_workers, start, stop, wait_healthy, worker_pids

pytestmark = pytest.mark.system


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


def labels_versions_by_worker(base: str) -> dict[int, set[str]]:
    """Each live worker's current label-set version(s), from its own clip_model_info{pid=...} samples."""
    versions: dict[int, set[str]] = {}
    for line in requests.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("clip_model_info{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
            current = versions.setdefault(int(labels["pid"]), set())
            if float(line.rsplit(" ", 1)[1]) == 1.0:
                current.add(labels["labels_version"])
    return versions


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
        workers = worker_pids(process.pid)
        assert len(workers) == 2
        healthy = {int(re.search(r'pid="(\d+)"', line).group(1)): float(line.rsplit(" ", 1)[1])
                   for line in requests.get(f"{base}/metrics", timeout=10).text.splitlines()
                   if line.startswith("clip_healthy{")}
        assert healthy == {pid: 1.0 for pid in workers}, "one sample per worker, none from the master"
        assert labels_versions_by_worker(base) == {pid: {version} for pid in workers}
        (labels / "animals.txt").write_text("cat\ndog\nhorse\n")
        os.kill(process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        # Each worker, by its pid, must report a new version: one that did not reload keeps the old one.
        while time.monotonic() < deadline:
            by_worker = labels_versions_by_worker(base)
            if all(len(found := by_worker.get(pid, set())) == 1 and version not in found for pid in workers):
                break
            time.sleep(0.2)
        assert set(by_worker) == workers, "the same two workers, none restarted"
        stale = sorted(pid for pid in workers if version in by_worker[pid])
        assert not stale, f"worker(s) {stale} still serve version {version}: {by_worker}"
        (new_version,) = set.union(*by_worker.values())
        assert by_worker == {pid: {new_version} for pid in workers}, by_worker
        assert requests.get(f"{base}/labels", timeout=10).json()["version"] == new_version
        assert requests.post(f"{base}/analyze", files={"file": ("x.png", image_bytes())},
                             timeout=30).status_code == 200
    finally:
        assert stop(process) == 0
    log = (tmp_path / "two.log").read_text()
    assert log.count(f"Labels reloaded: 3 labels, version {new_version}") == 2, "one line per worker"
    # Each worker encodes only the new label, or loads all three from the cache the other just wrote.
    assert log.count("Encoding 1 labels") >= 1
    assert log.count("Encoding 1 labels") + log.count("Loaded 3 label features") == 2
    assert "Encoding 3 labels" not in log
    assert log.count("with openvino") == 2, "both workers run the CPU's default engine"
    assert log.count("Converting CLIP_MODEL=") == 1, "the model is converted once, not per worker"


def test_sighup_while_a_worker_starts_up_does_not_end_it(server_env, tmp_path):
    """`systemctl reload` right after a start: the master forwards SIGHUP to a worker still loading
    the app, before it can reload anything; gunicorn's default for SIGHUP would end that worker."""
    process = start(server_env, tmp_path / "hup.log")
    try:
        deadline = time.monotonic() + 60
        while not (first := gunicorn_workers(process.pid)):
            assert time.monotonic() < deadline and process.poll() is None, "no worker started"
            time.sleep(0.005)
        sent, until = 0, time.monotonic() + 3
        while time.monotonic() < until:
            os.kill(process.pid, signal.SIGHUP)
            sent += 1
            time.sleep(0.02)
        wait_healthy(int(server_env["PORT"]), process, log_path=tmp_path / "hup.log")
        assert gunicorn_workers(process.pid) == first, f"a worker ended after {sent} SIGHUPs during its start"
    finally:
        assert stop(process) == 0
    assert "was sent SIGHUP" not in (tmp_path / "hup.log").read_text()


def hups_through_a_start(env: dict, log, command=None) -> tuple[int, int]:
    """Start the server, SIGHUP its main process every 100 ms from 0.5 s on (systemctl reload right
    after systemctl start, repeated) until it is healthy and 1 s more; (SIGHUPs sent, exit status)."""
    process = start(env, log) if command is None else start(env, log, command=command)
    sent, healthy = 0, threading.Event()

    def hup():
        nonlocal sent
        time.sleep(0.5)
        until = None
        while process.poll() is None and (until is None or time.monotonic() < until):
            os.kill(process.pid, signal.SIGHUP)
            sent += 1
            if until is None and healthy.is_set():
                until = time.monotonic() + 1
            time.sleep(0.1)

    sender = threading.Thread(target=hup)
    sender.start()
    try:
        try:
            wait_healthy(int(env["PORT"]), process, log_path=log)
        finally:
            healthy.set()
            sender.join(30)
        assert process.poll() is None, f"the main process ended after {sent} SIGHUPs"
        assert requests.get(f"http://127.0.0.1:{env['PORT']}/health", timeout=10).status_code == 200
    finally:
        status = stop(process)
    return sent, status


def test_sighups_from_half_a_second_after_start_never_end_clip_sh(server_env, tmp_path):
    """The master ended by SIGHUP, 5 starts of 5, and systemd counts that a clean exit (no restart):
    CLIP.sh's own subshells, and gunicorn before its handlers, took SIGHUP's default."""
    for start_number in range(5):
        env = {**server_env, "PORT": str(free_port())}
        sent, status = hups_through_a_start(env, tmp_path / f"hup-{start_number}.log")
        assert sent >= 5 and status == 0, (start_number, sent, status)


def test_sighups_from_half_a_second_after_start_never_end_rest_py(server_env, tmp_path):
    sent, status = hups_through_a_start(server_env, tmp_path / "rest-hup.log",
                                        [sys.executable, str(ROOT / "REST.py")])
    assert sent >= 5 and status in (0, -signal.SIGTERM), status


def test_python_rest_py_serves_too(server_env, tmp_path):
    process = start(server_env, tmp_path / "rest.log", command=[sys.executable, str(ROOT / "REST.py")])
    try:
        wait_healthy(int(server_env["PORT"]), process)
        response = requests.post(f"http://127.0.0.1:{server_env['PORT']}/analyze?url=http://user:pw@x.test/",
                                 files={"file": ("x.png", image_bytes())}, timeout=30)
        assert response.status_code == 400 and "got url and upload" in response.json()["error"]["message"]
    finally:
        stop(process)
    assert "user:pw" not in (tmp_path / "rest.log").read_text()
