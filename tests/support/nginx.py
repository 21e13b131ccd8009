"""A real nginx running the shipped services/nginx-clip.conf, aimed at test instances on loopback.

The shipped config is the single source: only its upstream ports, listen address and log folder are
pointed at this machine's loopback and a temporary folder, inside a minimal main nginx.conf.
"""

from __future__ import annotations

import getpass
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import requests

from tests.support.guard import require_system_test
from tests.support.system import find_program, unavailable

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = ROOT / "services" / "nginx-clip.conf"
NGINX = find_program("nginx", "/usr/sbin/nginx")  # as .ci/run looks for it


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


def require_nginx() -> str:
    """nginx's path; the test skips (fails in CI) without it. Call it before starting anything costly."""
    require_system_test("nginx")
    if NGINX is None:
        unavailable("nginx is not installed (apt-get install nginx; .ci/run installs it)")
    return NGINX


def nginx_command(main: Path, *extra: str) -> list[str]:
    """The nginx command line for a main config from nginx_config."""
    return [require_nginx(), "-p", f"{main.parent}/", "-c", str(main), "-e", str(main.parent / "error.log"),
            *extra]


def start_nginx(main: Path) -> subprocess.Popen:
    """nginx in the foreground, in its own process group; its stderr in nginx.out beside the config."""
    with (main.parent / "nginx.out").open("ab") as errors:
        return subprocess.Popen(nginx_command(main), stdout=subprocess.DEVNULL, stderr=errors,
                                start_new_session=True)


def stop_nginx(nginx: subprocess.Popen) -> None:
    """A graceful stop (SIGQUIT), then a kill after 10 s."""
    if nginx.poll() is not None:
        return
    nginx.send_signal(signal.SIGQUIT)
    try:
        nginx.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(nginx.pid, signal.SIGKILL)
        nginx.wait(timeout=10)


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
