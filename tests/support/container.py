"""Docker for the container tests, with no registry: the daemon, a Debian base image, the wheelhouse,
the two images, and containers and compose projects that are always removed.

Machines here reach Debian's archive and PyPI only. The base image is Debian bookworm made by
debootstrap and imported (it stands in for the Dockerfile's debian:bookworm-slim), and pip inside a
build reaches no index, so requirements.txt's wheels are downloaded on the host into wheelhouse/,
which the Dockerfile installs from when it holds wheels. Images and docker's build cache are kept
between runs: a later run rebuilds only what changed.

    .venv/bin/python -m tests.support.container     # base image, wheelhouse and both images, timed
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WHEELHOUSE = ROOT / "wheelhouse"
WHEEL_CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clip-service" / "wheelhouse"
BASE_IMAGE = "clip-service-base:bookworm"
IMAGE = "clip-service:test"
NGINX_IMAGE = "clip-service-nginx:test"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# Every docker command gets BuildKit (the Dockerfile's RUN --mount needs it; docker 23+ uses it anyway).
DOCKER_ENV = {**os.environ, "DOCKER_BUILDKIT": "1"}


class DockerMissing(Exception):
    """No docker client, or no daemon and no dockerd to start."""


def _builds_with_buildkit(client: str) -> bool:
    """Docker 23+ builds with BuildKit only through the buildx plugin; older clients have it built in."""
    if _run([client, "buildx", "version"]).returncode == 0:
        return True
    version = _run([client, "version", "--format", "{{.Client.Version}}"]).stdout.strip()
    major = version.split(".")[0]
    return major.isdigit() and int(major) < 23


def docker_client() -> str:
    """The docker client to use: the one on the PATH if it can build with BuildKit, else Debian's
    docker.io client (a newer client without buildx may sit first on the PATH)."""
    candidates = (shutil.which("docker"), "/usr/bin/docker")
    for client in dict.fromkeys(found for found in candidates if found and os.access(found, os.X_OK)):
        if _builds_with_buildkit(client):
            return client
    raise DockerMissing("no docker client that builds with BuildKit (apt-get install docker.io)")


def compose_command(client: str) -> list[str]:
    """`docker compose` (v2) where the plugin is installed, else Debian's docker-compose (v1)."""
    if _run([client, "compose", "version"]).returncode == 0:
        return [client, "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise DockerMissing("neither `docker compose` nor docker-compose (apt-get install docker-compose)")


def output_tail(result: subprocess.CompletedProcess, characters: int = 3000) -> str:
    return f"{result.stdout[-characters:]}\n{result.stderr[-characters:]}"


def _run(command: list[str], timeout: float = 60, **options) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=DOCKER_ENV,
                              **options)
    except FileNotFoundError as missing:
        return subprocess.CompletedProcess(command, 127, "", str(missing))


class Docker:
    """One docker client: commands that fail raise with their output."""

    def __init__(self, client: str):
        self.client = client

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        result = _run([self.client, *args], timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)}: exit {result.returncode}\n{output_tail(result)}")
        return result

    def out(self, *args: str, timeout: float = 120) -> str:
        return self.run(*args, timeout=timeout).stdout.strip()

    def answers(self) -> bool:
        return self.run("info", "--format", "{{.ServerVersion}}", timeout=30, check=False).returncode == 0

    def has_image(self, name: str) -> bool:
        return self.run("image", "inspect", name, check=False).returncode == 0

    def inspect(self, name: str, template: str) -> str:
        return self.out("inspect", "--format", template, name)

    def remove(self, *containers: str) -> None:
        if containers:
            self.run("rm", "--force", "--volumes", *containers, check=False)


@contextlib.contextmanager
def running_daemon(docker: Docker, log_path: Path) -> Iterator[None]:
    """A docker daemon for the block: the one running, or dockerd started here and stopped after."""
    if docker.answers():
        yield
        return
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if not os.access(dockerd, os.X_OK):
        raise DockerMissing("no docker daemon runs, and no dockerd to start (apt-get install docker.io)")
    with open(log_path, "ab") as log:
        daemon = subprocess.Popen([dockerd], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not docker.answers():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"dockerd did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=60)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=10)


def ensure_base_image(docker: Docker) -> float:
    """BASE_IMAGE, made by debootstrap (minbase, bookworm) and `docker import` when missing: seconds taken."""
    if docker.has_image(BASE_IMAGE):
        return 0.0
    debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
    if not os.access(debootstrap, os.X_OK):
        raise DockerMissing(f"no {BASE_IMAGE} image and no debootstrap (apt-get install it)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="clip-service-rootfs-") as rootfs:
        made = subprocess.run([debootstrap, "--variant=minbase", "bookworm", rootfs, DEBIAN_MIRROR],
                              capture_output=True, text=True, timeout=900)
        if made.returncode != 0:
            raise AssertionError(f"debootstrap failed:\n{output_tail(made)}")
        # The downloaded packages are not part of a base image.
        for deb in Path(rootfs, "var/cache/apt/archives").glob("*.deb"):
            deb.unlink()
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        imported = subprocess.run([docker.client, "import", "-", BASE_IMAGE], stdin=tar.stdout,
                                  capture_output=True, text=True, timeout=600, env=DOCKER_ENV)
        tar.stdout.close()
        tar.wait(timeout=60)
        if imported.returncode != 0:
            raise AssertionError(f"docker import failed: {imported.stderr[-3000:]}")
    return time.monotonic() - started


def fill_wheelhouse() -> float:
    """requirements.txt's wheels (and their dependencies') in WHEELHOUSE, for this interpreter's Python
    and platform, which the base image's Python 3.11 on x86-64 shares: seconds taken.

    They are downloaded once per requirements.txt into WHEEL_CACHE, outside the clone, and linked
    from there, so a fresh clone does not download 3 GB again; wheels of other requirements leave
    WHEELHOUSE, since every file there is part of the image's cache key.
    """
    started = time.monotonic()
    key = hashlib.sha256((ROOT / "requirements.txt").read_bytes())
    key.update(f"{sys.version_info[:2]} {platform.machine()}".encode())
    cached = WHEEL_CACHE / key.hexdigest()[:16]
    if not cached.is_dir():
        WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".download-", dir=WHEEL_CACHE))
        try:
            downloaded = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--dest",
                 str(scratch), "--requirement", str(ROOT / "requirements.txt")],
                capture_output=True, text=True, timeout=900)
            if downloaded.returncode != 0:
                raise AssertionError(f"pip download failed:\n{output_tail(downloaded)}")
            os.rename(scratch, cached)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    wanted = {wheel.name for wheel in cached.glob("*.whl")}
    for present in WHEELHOUSE.glob("*.whl"):
        if present.name not in wanted:
            present.unlink()
    for name in wanted - {present.name for present in WHEELHOUSE.glob("*.whl")}:
        try:
            os.link(cached / name, WHEELHOUSE / name)
        except OSError:  # another file system
            shutil.copy2(cached / name, WHEELHOUSE / name)
    return time.monotonic() - started


def build(docker: Docker, tag: str, target: str | None = None) -> float:
    """`docker build` of the repository's Dockerfile on BASE_IMAGE (the only change from the README's
    command): seconds taken."""
    started = time.monotonic()
    docker.run("build", "--build-arg", f"BASE={BASE_IMAGE}", *(["--target", target] if target else []),
               "--tag", tag, str(ROOT), timeout=1800)
    return time.monotonic() - started


def image_size(docker: Docker, name: str) -> int:
    return int(docker.inspect(name, "{{.Size}}"))


def build_everything(docker: Docker) -> dict[str, float]:
    """Base image, wheelhouse and both images; the seconds each step took."""
    return {"base image": ensure_base_image(docker), "wheelhouse": fill_wheelhouse(),
            "service image": build(docker, IMAGE), "nginx image": build(docker, NGINX_IMAGE, "nginx")}


if __name__ == "__main__":
    client = Docker(docker_client())
    with running_daemon(client, Path(tempfile.gettempdir()) / "clip-service-dockerd.log"):
        for step, seconds in build_everything(client).items():
            print(f"{step}: {seconds:.1f} s")
        for name in (IMAGE, NGINX_IMAGE):
            print(f"{name}: {image_size(client, name) / 1e9:.2f} GB")
