"""Scale-out: two real instances (CLIP.sh) behind a real nginx running services/nginx-clip.conf.

The shipped config is the single source: the test only points its upstream ports, listen address and
log folder at this machine's loopback and a temporary folder, and wraps it in a minimal nginx.conf.
"""

from __future__ import annotations

import getpass
import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from conftest import free_port
from system_tools import find_program, unavailable
from test_routes import image_bytes
from test_serving import server_env, start, stop, wait_healthy  # noqa: F401  (server_env: a fixture)

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_CONFIG = ROOT / "services" / "nginx-clip.conf"


NGINX = find_program("nginx", "/usr/sbin/nginx")  # as .ci/run looks for it


@pytest.fixture(autouse=True)
def _nginx_installed():
    if NGINX is None:
        unavailable("nginx is not installed (apt-get install nginx; .ci/run installs it)")


def nginx_config(folder: Path, listen_port: int, upstream_ports: list[int]) -> Path:
    """services/nginx-clip.conf aimed at loopback ports, inside a main config that keeps to `folder`."""
    text = SHIPPED_CONFIG.read_text()
    ports = iter(upstream_ports)
    text, servers = re.subn(r"(?m)^(\s*server 127\.0\.0\.1:)\d+", lambda m: f"{m[1]}{next(ports)}", text)
    assert servers == len(upstream_ports), "the shipped upstream should list one server per test instance"
    text, listens = re.subn(r"(?m)^(\s*)listen 80;", rf"\g<1>listen 127.0.0.1:{listen_port};", text)
    assert listens == 1, "the shipped server block should listen on port 80"
    text = text.replace("/var/log/nginx/", f"{folder}/")
    # As root, nginx's workers would run as `nobody`, which cannot enter pytest's private tmp folder.
    user = f"user {getpass.getuser()};" if os.geteuid() == 0 else ""
    temp_paths = "\n".join(f"    {kind}_temp_path {folder}/{kind}_temp;"
                           for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    main = folder / "nginx.conf"
    main.write_text(f"""{user}
daemon off;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log info;
events {{ worker_connections 256; }}
http {{
{temp_paths}
    access_log {folder}/access.log;
{text}
}}
""")
    return main


def nginx_command(main: Path, *extra: str) -> list[str]:
    return [NGINX, "-p", f"{main.parent}/", "-c", str(main), "-e", str(main.parent / "error.log"), *extra]


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


def wait_listening(base: str, nginx: subprocess.Popen) -> requests.Response:
    """nginx's first answer to /health, once it listens."""
    deadline = time.monotonic() + 15
    while True:
        assert nginx.poll() is None, "nginx exited at start"
        try:
            return requests.get(f"{base}/health", timeout=5)
        except requests.ConnectionError:
            assert time.monotonic() < deadline, "nginx did not start listening"
            time.sleep(0.1)


def uploads_served(port: int) -> float:
    return analyze_counts(port).get(("upload", "200"), 0.0)


def test_shipped_config_passes_nginx_t(tmp_path):
    main = nginx_config(tmp_path, free_port(), [free_port(), free_port()])
    result = subprocess.run(nginx_command(main, "-t"), capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "syntax is ok" in result.stderr and "test is successful" in result.stderr


def test_two_instances_behind_nginx_share_load_and_survive_one_stopping(server_env, tmp_path):  # noqa: F811
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
        nginx = subprocess.Popen(nginx_command(main), stdout=subprocess.DEVNULL,
                                 stderr=(tmp_path / "nginx.out").open("wb"), start_new_session=True)
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
        if nginx is not None and nginx.poll() is None:
            nginx.send_signal(signal.SIGQUIT)
            try:
                nginx.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(nginx.pid, signal.SIGKILL)
                nginx.wait(timeout=10)
        for _, process in instances:
            stop(process)
    log = (tmp_path / "clip-service.access.log").read_text()
    assert "upstream_status=502, 200" in log, "the stopped instance's request was resent to the other"
    assert closed not in log and "url=" not in log, "the access log must not record image URLs"
