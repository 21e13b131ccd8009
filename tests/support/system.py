"""What some tests need from the machine: chromium, nginx, and an unprivileged user for permission checks.

CI (CI=true, set by .ci/run) installs chromium and nginx, so a missing one there is a failure, never a
quiet skip. CI runs as root, which reads and writes any file: permission checks run in a forked child
that drops to the `nobody` user, so they are checked there too instead of being skipped.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import select
import shutil
import signal
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"


def unavailable(reason: str) -> None:
    """Skip the test where a system tool is missing; fail it in CI, which installs every tool."""
    if IN_CI:
        pytest.fail(f"{reason} (CI=true: .ci/run installs it, so this is a broken set-up, not a skip)")
    pytest.skip(reason)


def find_program(name: str, *fallbacks: str) -> str | None:
    """The program on the PATH (what .ci/run checks with `command -v`), else an executable fallback."""
    found = shutil.which(name)
    if found:
        return found
    return next((path for path in fallbacks if os.access(path, os.X_OK)), None)


@contextlib.contextmanager
def shared_folder() -> Iterator[Path]:
    """A temporary folder that an unprivileged user can enter (pytest's own tmp folders are 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="clip-service-perm-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        for path in [folder, *folder.rglob("*")]:
            with contextlib.suppress(OSError):
                path.chmod(0o700 if path.is_dir() else 0o600)
        shutil.rmtree(folder, ignore_errors=True)


def run_unprivileged(check: Callable[[], None], timeout: float = 60) -> None:
    """Run `check` where file permissions apply: as is for an ordinary user, as `nobody` for root.

    For root the check runs in a forked child that drops its groups, group and user for good (the
    interpreter may live under /root, which `nobody` cannot enter, so the child does not exec). An
    assertion in the child fails the test with the child's traceback.
    """
    if os.geteuid() != 0:
        check()
        return
    nobody = pwd.getpwnam("nobody")
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        outcome = b"ok"
        try:
            os.close(reader)
            os.setgroups([])
            os.setgid(nobody.pw_gid)
            os.setuid(nobody.pw_uid)
            assert os.geteuid() == nobody.pw_uid and os.getegid() == nobody.pw_gid
            check()
        except BaseException:  # everything goes back to the parent as text
            outcome = traceback.format_exc().encode()[-60_000:]
        finally:
            with contextlib.suppress(OSError):
                os.write(writer, outcome)
            os._exit(0)
    os.close(writer)
    chunks, timed_out, deadline = [], False, time.monotonic() + timeout
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([reader], [], [], remaining)[0]:
                timed_out = True
                break
            chunk = os.read(reader, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(reader)
        if timed_out:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    outcome = b"".join(chunks).decode(errors="replace")
    if outcome != "ok":
        pytest.fail(f"the check as user nobody failed:\n{outcome or f'no answer within {timeout} s'}")
