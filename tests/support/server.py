"""Real server processes, for the whole-system tests and for bench/: CLIP.sh (gunicorn), REST.py, or any
server with a /health route, started in a clean environment, waited for until healthy, and stopped
with every process it forked.

The environment is cleaned here and nowhere else: every setting the service reads (the settings' own
list, ENV_VARIABLES) and the variables read at start-up are dropped, and no .env is read, so what a
test or a benchmark runs is what it says, whatever the caller's shell exports (MAX_QUEUE, THREADS...).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import requests

from clip_service.settings import ENV_VARIABLES
from tests.support.guard import require_system_test
from tests.support.http_fixtures import free_port
from tests.support.images import image_bytes

ROOT = Path(__file__).resolve().parents[2]
CLIP_SH = ROOT / "CLIP.sh"
NO_ENV_FILE = "/nonexistent/.env"
# Read at start-up, though not settings: which .env to read, gunicorn's own options, the metrics folder.
# CLIP_VENV, which only picks the interpreter CLIP.sh runs, is kept.
STARTUP_VARIABLES = ("CLIP_ENV_FILE", "GUNICORN_CMD_ARGS", "PROMETHEUS_MULTIPROC_DIR")


def clean_environment(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The caller's environment without any setting or start-up variable, reading no .env, plus
    `overrides`: for every process a test or benchmark starts (servers, the tag command)."""
    env = {name: value for name, value in os.environ.items()
           if name not in ENV_VARIABLES and name not in STARTUP_VARIABLES}
    env["CLIP_ENV_FILE"] = NO_ENV_FILE
    env.update(overrides or {})
    return env


def clip_sh_env(model: str, labels_dir: Path, emoji_file: Path, cache_dir: Path, *, api_port: int,
                api_timeout: float, **settings) -> dict[str, str]:
    """CLIP.sh's settings for a test: a free port, PRIVATE=True, every label answered (threshold 0), the
    emoji API on 127.0.0.1:`api_port`; `settings` (NAME=value) add to them or replace them."""
    env = {
        "PORT": str(free_port()), "PRIVATE": "True", "CLIP_MODEL": model,
        "CLIP_LABELS_DIR": str(labels_dir), "CLIP_CACHE_DIR": str(cache_dir),
        "EMOJI_DICTIONARY": str(emoji_file), "CLIP_CONFIDENCE_THRESHOLD": "0",
        "API_HOST": "127.0.0.1", "API_PORT": str(api_port), "API_TIMEOUT": str(api_timeout),
        # the tests' reference engine, as the `settings` fixture's; a test of OpenVINO's server says so
        # (CLIP_BACKEND=auto or openvino), since each start of one converts the model
        "CLIP_BACKEND": "torch",
    }
    env.update({name: str(value) for name, value in settings.items()})
    return env


def start(env: Mapping[str, str], log_path: Path, command: Sequence[str] = (str(CLIP_SH),),
          cwd: Path | str = "/") -> subprocess.Popen:
    """`command` (CLIP.sh by default) in its own process group, in clean_environment() plus `env`,
    its output appended to `log_path`. From / by default: CLIP.sh must find its own folder."""
    require_system_test(" ".join(Path(word).name for word in command))
    with Path(log_path).open("ab") as log:
        return subprocess.Popen(list(command), cwd=cwd, env=clean_environment(env), stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)


def log_tail(log_path: Path, lines: int = 30) -> str:
    """The last lines of a server's log ("" before it has one)."""
    if not Path(log_path).exists():
        return ""
    return "\n".join(Path(log_path).read_text(errors="replace").splitlines()[-lines:])


def _with_log(log_path: Path | None) -> str:
    return f"; the last lines of {log_path}:\n{log_tail(log_path)}" if log_path else ""


def wait_healthy(port: int, process: subprocess.Popen, timeout: float = 90, log_path: Path | None = None,
                 interval: float = 0.1) -> dict:
    """The first 200 answer of /health on 127.0.0.1:`port`. Until then the server may refuse
    connections or say it is loading; exiting, failing to load or a timeout fails, with the log's tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited ({process.returncode}) during start-up"
                                 f"{_with_log(log_path)}")
        try:
            response = requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
        except requests.RequestException:
            pass  # not listening yet, or busy starting
        else:
            if response.status_code == 200:
                return response.json()
            assert response.json().get("model_status") == "loading", \
                f"/health answered {response.status_code}: {response.text}{_with_log(log_path)}"
        time.sleep(interval)
    raise AssertionError(f"the server was not healthy after {timeout:g} s{_with_log(log_path)}")


def stop(process: subprocess.Popen, timeout: float = 30) -> int:
    """SIGTERM to the process group (gunicorn drains, then its workers exit); its exit status.

    A group still running after `timeout` seconds is killed, and that fails the caller.
    """
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        raise AssertionError(f"pid {process.pid} still ran {timeout:g} s after SIGTERM; killed") from None


def worker_pids(master: int) -> set[int]:
    """The gunicorn master's child processes: its workers."""
    children = set()
    for task in Path(f"/proc/{master}/task").glob("*"):
        with contextlib.suppress(OSError):
            children.update(int(pid) for pid in (task / "children").read_text().split())
    return children


def gunicorn_workers(master: int, settle: float = 0.1) -> set[int]:
    """The gunicorn master's workers: children with the master's own command line (forked, not exec'd)
    that are still there `settle` seconds later. A script's subshell or a command a library runs during
    start-up (both seen before the first worker) has another command line, or is gone by then."""
    def forked() -> set[int]:
        try:
            own = Path(f"/proc/{master}/cmdline").read_bytes()
        except OSError:
            return set()
        found = set()
        for pid in worker_pids(master):
            with contextlib.suppress(OSError):
                if b"gunicorn" in own and Path(f"/proc/{pid}/cmdline").read_bytes() == own:
                    found.add(pid)
        return found

    first = forked()
    if not first:
        return set()
    time.sleep(settle)
    return first & forked()


class ClipServer:
    """CLIP.sh (or `command` running it) started with `env` and healthy on 127.0.0.1; stop() returns
    its exit status."""

    def __init__(self, env: Mapping[str, str], log: Path, command: Sequence[str] = (str(CLIP_SH),)):
        self.port = int(env["PORT"])
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.process = start(env, log, command)
        try:
            wait_healthy(self.port, self.process, log_path=log)
        except BaseException:
            stop(self.process)
            raise

    def upload(self, data: bytes | None = None, timeout: float = 30) -> requests.Response:
        # A fresh connection per request, as independent clients open them.
        return requests.post(f"{self.base}/analyze", files={"file": ("x.png", data or image_bytes())},
                             timeout=timeout, headers={"Connection": "close"})

    def in_flight(self) -> float:
        """clip_requests_in_flight from /metrics: the requests admitted and not yet answered."""
        text = requests.get(f"{self.base}/metrics", timeout=10).text
        return float(re.search(r"(?m)^clip_requests_in_flight (\S+)$", text)[1])

    def stop(self) -> int:
        return stop(self.process)
