"""Scale-out: two real instances (CLIP.sh) behind a real nginx running services/nginx-clip.conf.

The shipped config is the single source: tests/support/nginx.py only points its upstream ports, listen
address and log folder at this machine's loopback and a temporary folder, inside a minimal nginx.conf.
"""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.support.http_fixtures import free_port
from tests.support.images import image_bytes
from tests.support.nginx import (
    nginx_command,
    nginx_config,
    require_nginx,
    start_nginx,
    stop_nginx,
    wait_listening,
)
from tests.support.server import start, stop, wait_healthy

pytestmark = pytest.mark.system


def analyze_counts(port: int) -> dict[tuple[str, str], float]:
    """One instance's clip_requests_total for /analyze, by (input, status)."""
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    counts: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        if line.startswith("clip_requests_total{") and 'route="/analyze"' in line:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
            key = (labels["input"], labels["status"])
            counts[key] = counts.get(key, 0) + float(line.rsplit(" ", 1)[1])
    return counts


def uploads_served(port: int) -> float:
    return analyze_counts(port).get(("upload", "200"), 0.0)


def test_shipped_config_passes_nginx_t(tmp_path):
    main = nginx_config(tmp_path, free_port(), [free_port(), free_port()])
    result = subprocess.run(nginx_command(main, "-t"), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr and "test is successful" in result.stderr


def test_two_instances_behind_nginx_share_load_and_survive_one_stopping(server_env, tmp_path):
    require_nginx()
    instances = []
    for name in ("gpu0", "gpu1"):
        metrics_dir = tmp_path / f"{name}-metrics"
        metrics_dir.mkdir()
        env = {**server_env, "PORT": str(free_port()), "CLIP_CACHE_DIR": str(tmp_path / f"{name}-cache"),
               "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        instances.append((int(env["PORT"]), start(env, tmp_path / f"{name}.log")))
    (port_a, process_a), (port_b, process_b) = instances
    nginx_port = free_port()
    main = nginx_config(tmp_path, nginx_port, [port_a, port_b])
    nginx = None
    base = f"http://127.0.0.1:{nginx_port}"

    def upload(_=None) -> requests.Response:
        return requests.post(f"{base}/analyze", files={"file": ("x.png", image_bytes())}, timeout=30)

    try:
        for port, process in instances:
            wait_healthy(port, process)
        nginx = start_nginx(main)
        health = wait_listening(base, nginx)
        assert health.status_code == 200 and health.json()["model_status"] == "loaded"

        # Both instances serve uploads sent through nginx, each request counted exactly once.
        answers = [upload() for _ in range(8)]
        with ThreadPoolExecutor(4) as pool:
            answers += list(pool.map(upload, range(8)))
        for response in answers:
            assert response.status_code == 200, response.text
            assert response.json()["status"] == "success"
        served_a, served_b = uploads_served(port_a), uploads_served(port_b)
        assert served_a > 0 and served_b > 0, f"least_conn should spread requests: {served_a}, {served_b}"
        assert served_a + served_b == len(answers)
        # /metrics is scraped per instance, never through nginx.
        assert requests.get(f"{base}/metrics", timeout=10).status_code == 404
        # An upload over client_max_body_size: nginx refuses it, in the service's error shape.
        huge = requests.post(f"{base}/analyze", files={"file": ("x.png", bytes(10 << 20))}, timeout=30)
        assert huge.status_code == 413 and huge.json()["status"] == "error"

        # The service's own 502 (a URL it cannot fetch) reaches the client once, not retried.
        closed = f"http://127.0.0.1:{free_port()}/x.jpg"
        failed = requests.get(f"{base}/analyze", params={"url": closed}, timeout=30)
        assert failed.status_code == 502 and failed.json()["status"] == "error"
        url_502 = sum(analyze_counts(port).get(("url", "502"), 0) for port in (port_a, port_b))
        assert url_502 == 1, "nginx must not resend a request the service answered with 502"

        # One instance stops: every request through nginx still succeeds, on the other one.
        assert stop(process_a) == 0
        before_b = uploads_served(port_b)
        after_stop = [upload() for _ in range(12)]
        with ThreadPoolExecutor(4) as pool:
            after_stop += list(pool.map(upload, range(8)))
        assert [r.status_code for r in after_stop] == [200] * 20, [r.text for r in after_stop if not r.ok]
        assert uploads_served(port_b) - before_b == 20
        assert requests.get(f"{base}/health", timeout=10).status_code == 200

        # None left: nginx answers in the service's JSON error shape, with Retry-After.
        assert stop(process_b) == 0
        down = upload()
        assert down.status_code == 503 and down.headers.get("Retry-After") == "5"
        assert down.json()["status"] == "error" and down.json()["predictions"] == []
    finally:
        if nginx is not None:
            stop_nginx(nginx)
        for _, process in instances:
            stop(process)
    log = (tmp_path / "clip-service.access.log").read_text()
    assert "upstream_status=502, 200" in log, "the stopped instance's request was resent to the other"
    assert closed not in log and "url=" not in log, "the access log must not record image URLs"
