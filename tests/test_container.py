"""The container image and compose.yaml, run for real: `docker build` of the Dockerfile (with only the
base image and the wheelhouse swapped for what this machine can reach, tests/support/container.py),
containers on tiny models mounted read-only, and the compose stack through its nginx.

Skipped without docker, except with CI=true (.ci/run installs docker.io, debootstrap and
docker-compose; a daemon is started here when none runs). Every port is published on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import requests

from tests.support.container import (
    DOCKER_ENV,
    IMAGE,
    NGINX_IMAGE,
    ROOT,
    Docker,
    DockerMissing,
    build_everything,
    compose_command,
    docker_client,
    image_size,
    output_tail,
    running_daemon,
)
from tests.support.guard import require_system_test
from tests.support.http_fixtures import free_port
from tests.support.images import encode, image_bytes
from tests.support.models import write_tiny_clip
from tests.support.system import shared_folder, unavailable
from tests.support.trained_clip import COLOURS, draw_picture, trained_model
from tests.support.waiting import wait_for

pytestmark = pytest.mark.system

# gunicorn.conf.py's graceful_timeout, max(30, REQUEST_TIMEOUT + 5), at the REQUEST_TIMEOUT set below.
REQUEST_TIMEOUT = 30
GRACEFUL_TIMEOUT = 35
START_TIMEOUT = 240  # seconds to healthy: generous for a busy 2-core machine
CONTAINER_UID = 10001  # the Dockerfile's user `clip`


@pytest.fixture(scope="module")
def docker(tmp_path_factory) -> Iterator[Docker]:
    require_system_test("docker")
    with contextlib.ExitStack() as stack:
        try:
            client = Docker(docker_client())
            stack.enter_context(running_daemon(client, tmp_path_factory.mktemp("dockerd") / "dockerd.log"))
        except DockerMissing as missing:
            unavailable(str(missing))
        yield client


@pytest.fixture(scope="module")
def images(docker) -> None:
    seconds = build_everything(docker)
    print("\nbuild: " + ", ".join(f"{step} {took:.1f} s" for step, took in seconds.items())
          + f"; {IMAGE} {image_size(docker, IMAGE) / 1e9:.2f} GB, "
          f"{NGINX_IMAGE} {image_size(docker, NGINX_IMAGE) / 1e9:.2f} GB")


@pytest.fixture(scope="module")
def mounts() -> Iterator[Path]:
    """Folders a container user (uid 10001) can read: pytest's own temporary folders are 0700."""
    with shared_folder() as folder:
        yield folder


def readable(folder: Path) -> Path:
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


def wait_healthy(docker: Docker, container: str, base: str, timeout: float = START_TIMEOUT) -> dict:
    """The first 200 from `base`/health; the container exiting or a timeout fails with its log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            response = requests.get(f"{base}/health", timeout=2)
            if response.status_code == 200:
                return response.json()
        if docker.inspect(container, "{{.State.Running}}") != "true":
            break
        time.sleep(0.1)
    logs = docker.run("logs", "--tail", "40", container, check=False)
    raise AssertionError(f"{container} not healthy at {base} (running: "
                         f"{docker.inspect(container, '{{.State.Running}}')}):\n{logs.stdout}{logs.stderr}")


@dataclass
class Service:
    """One container of the image on the tiny model, as a user runs it (README, "Container")."""

    docker: Docker
    folder: Path
    volume: str
    name: str = ""
    port: int = 0
    starts: list[float] = field(default_factory=list)  # seconds from `docker run` to /health 200

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.name, self.port = f"clip-service-test-{os.getpid()}-{len(self.starts)}", free_port()
        started = time.monotonic()
        self.docker.run(
            "run", "--detach", "--name", self.name, "--read-only", "--tmpfs", "/tmp",
            "--env-file", str(self.folder / "clip.env"), "--publish", f"127.0.0.1:{self.port}:7778",
            "--volume", f"{self.volume}:/cache",
            *(option for mount in ("model", "labels", "photos", "index")
              for option in ("--volume", f"{self.folder / mount}:/{mount}:ro")),
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--stop-timeout", "40", IMAGE)
        wait_healthy(self.docker, self.name, self.base)
        self.starts.append(time.monotonic() - started)

    def health(self) -> dict:
        return requests.get(f"{self.base}/health", timeout=10).json()


@pytest.fixture(scope="module")
def service(docker, images, mounts) -> Iterator[Service]:
    """The image with every setting from an env file, the shipped labels mounted over its own, a
    photo folder for file=, and a fresh model cache volume; first started here, cold."""
    folder = mounts / "service"
    write_tiny_clip(folder / "model")
    (folder / "labels").mkdir()
    for labels in (ROOT / "labels").glob("*.txt"):
        shutil.copy(labels, folder / "labels")
    (folder / "photos").mkdir()
    (folder / "photos" / "photo.png").write_bytes(image_bytes("PNG"))
    env_file = folder / "clip.env"
    env_file.write_text(
        "CLIP_MODEL=local-dir:/model\nCLIP_LABELS_DIR=/labels\nALLOWED_FILE_ROOTS=/photos\n"
        f"REQUEST_TIMEOUT={REQUEST_TIMEOUT}\nWORKERS=1\nLOG_LEVEL=INFO\n"
        # The random model spreads its confidence over 2,000 labels, under the default threshold.
        "CLIP_CONFIDENCE_THRESHOLD=0\n")
    readable(folder)
    # The photo index, made by the image's own `index` command into a folder its user may write (its
    # /cache is a throwaway volume, so the service's first start below is still cold).
    (folder / "index").mkdir()
    os.chown(folder / "index", CONTAINER_UID, -1)
    docker.run("run", "--rm", "--read-only", "--tmpfs", "/tmp", "--env-file", str(env_file),
               "--volume", f"{folder / 'model'}:/model:ro", "--volume", f"{folder / 'photos'}:/photos:ro",
               "--volume", f"{folder / 'index'}:/index", "--entrypoint", "/opt/clip-service/.venv/bin/python",
               IMAGE, "-m", "clip_service", "index", "/photos", "-o", "/index/photos.clipindex", timeout=600)
    with env_file.open("a") as env:
        env.write("SEARCH_INDEX=/index/photos.clipindex\n")
    service = Service(docker, folder, volume=f"clip-service-test-cache-{os.getpid()}")
    try:
        service.start()
        yield service
    finally:
        docker.remove(*(f"clip-service-test-{os.getpid()}-{n}" for n in range(len(service.starts) + 1)))
        docker.run("volume", "rm", "--force", service.volume, check=False)


def test_health_and_an_upload_answered(service):
    health = service.health()
    assert health["status"] == "healthy" and health["model"] == "local-dir:model"
    shipped = {line.strip() for path in (ROOT / "labels").glob("*.txt")
               for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert health["num_labels"] == len(shipped)
    response = requests.post(f"{service.base}/analyze", files={"file": ("p.png", image_bytes("PNG"))},
                             timeout=30)
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert predictions and all(prediction["label"] in shipped for prediction in predictions)


def test_file_input_under_a_mounted_folder_only(service):
    inside = requests.get(f"{service.base}/analyze", params={"file": "/photos/photo.png"}, timeout=30)
    assert inside.status_code == 200, inside.text
    assert inside.json()["predictions"]
    outside = requests.get(f"{service.base}/analyze", params={"file": "/opt/clip-service/labels/emoji.json"},
                           timeout=30)
    assert outside.status_code == 403, outside.text
    assert "ALLOWED_FILE_ROOTS" in outside.json()["error"]["message"]


def test_photo_search_on_a_mounted_index(service):
    index = requests.get(f"{service.base}/search/index", timeout=10)
    assert index.status_code == 200, index.text
    assert index.json()["index"]["images"] == 1
    found = requests.get(f"{service.base}/search", params={"q": "a photo", "k": 3}, timeout=30)
    assert found.status_code == 200, found.text
    assert [match["path"] for match in found.json()["matches"]] == ["photo.png"]
    thumbnail = requests.get(f"{service.base}/search/thumbnail", params={"path": "photo.png"}, timeout=30)
    assert thumbnail.status_code == 200 and thumbnail.headers["Content-Type"] == "image/jpeg"


def test_runs_unprivileged_on_a_read_only_root(service):
    docker = service.docker
    processes = docker.out("top", service.name, "-o", "pid,uid,args").splitlines()[1:]
    assert len(processes) >= 3, processes  # tini, gunicorn's master, its worker
    assert all(line.split()[1] == str(CONTAINER_UID) for line in processes), processes
    assert docker.inspect(service.name, "{{.HostConfig.ReadonlyRootfs}}") == "true"
    for path in ("/opt/clip-service/written", "/written"):
        written = docker.run("exec", service.name, "touch", path, check=False)
        assert written.returncode != 0 and "Read-only file system" in written.stderr, written
    # What the service did write went to the cache volume: OpenVINO's conversion, the label features.
    cached = docker.out("exec", service.name, "find", "/cache/clip-service", "-type", "f")
    assert "/cache/clip-service/openvino/" in cached and "label-features-" in cached, cached


def test_sighup_reloads_the_mounted_labels(service):
    docker, labels = service.docker, service.folder / "labels"
    before = service.health()["num_labels"]
    extra = labels / "zz-extra.txt"
    extra.write_text("a label only this test adds\n")
    extra.chmod(0o644)
    try:
        docker.run("kill", "--signal", "HUP", service.name)
        assert wait_for_labels(service, before + 1), service.health()
    finally:
        extra.unlink()
        docker.run("kill", "--signal", "HUP", service.name)
    assert wait_for_labels(service, before), service.health()


def wait_for_labels(service: Service, count: int, timeout: float = 60) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if service.health()["num_labels"] == count:
            return True
        time.sleep(0.2)
    return False


def test_sigterm_stops_it_cleanly_and_a_warm_cache_starts_faster(service):
    docker = service.docker
    # The image's own HEALTHCHECK has seen /health 200 by now (it probes every 10 s).
    assert wait_for(lambda: docker.inspect(service.name, "{{.State.Health.Status}}") == "healthy", 60), \
        docker.inspect(service.name, "{{json .State.Health}}")
    signalled = time.monotonic()
    docker.run("kill", "--signal", "TERM", service.name)
    status = docker.out("wait", service.name, timeout=GRACEFUL_TIMEOUT + 30)
    stopped_after = time.monotonic() - signalled
    assert status == "0", docker.run("logs", "--tail", "20", service.name).stderr
    assert stopped_after < GRACEFUL_TIMEOUT
    service.start()  # a new container on the same cache volume
    cold, warm = service.starts
    print(f"\ncontainer: SIGTERM -> exit 0 in {stopped_after:.1f} s; start to /health 200: "
          f"{cold:.1f} s with an empty cache volume, {warm:.1f} s with it warm")
    assert warm < cold
    assert service.health()["status"] == "healthy"


# ------------------------------------------------------------------------------------------ compose

OVERRIDE = """\
# The test's additions to compose.yaml: the colour-trained model and colour labels, read-only.
x-test: &test
  environment:
    CLIP_MODEL: local-dir:/model
    CLIP_LABELS_DIR: /labels
  volumes:
    - {model}:/model:ro
    - {labels}:/labels:ro
services:
  clip-1: *test
  clip-2: *test
"""


@dataclass
class Stack:
    command: list[str]
    env: dict[str, str]
    base: str

    def __call__(self, *args: str, timeout: float = 120) -> str:
        result = subprocess.run([*self.command, *args], capture_output=True, text=True, env=self.env,
                                timeout=timeout, cwd=ROOT)
        assert result.returncode == 0, f"compose {' '.join(args)}:\n{output_tail(result)}"
        return result.stdout.strip()

    def container(self, service: str) -> str:
        return self("ps", "-q", service)


@pytest.fixture(scope="module")
def stack(docker, images, mounts, request) -> Iterator[Stack]:
    """`docker compose up` of compose.yaml with the test images, the colour-trained model and colour
    labels, published on a free port of 127.0.0.1."""
    folder = mounts / "stack"
    cache = getattr(request.config, "cache", None)
    shutil.copytree(trained_model(cache.mkdir("trained-clip") if cache else mounts / "training"),
                    folder / "model")
    (folder / "labels").mkdir()
    (folder / "labels" / "colours.txt").write_text("\n".join(COLOURS) + "\n")
    readable(folder)
    override = folder / "override.yaml"
    override.write_text(OVERRIDE.format(model=folder / "model", labels=folder / "labels"))
    port = free_port()
    env = {**DOCKER_ENV, "CLIP_IMAGE": IMAGE, "CLIP_NGINX_IMAGE": NGINX_IMAGE, "CLIP_PUBLISH": "127.0.0.1",
           "CLIP_HOST_PORT": str(port)}
    command = [*compose_command(docker.client), "--project-name", f"clipservicetest{os.getpid()}",
               "--file", str(ROOT / "compose.yaml"), "--file", str(override)]
    stack = Stack(command, env, f"http://127.0.0.1:{port}")
    started = time.monotonic()
    try:
        stack("up", "--detach", "--no-build", timeout=START_TIMEOUT + 60)
        wait_healthy(docker, stack.container("nginx"), stack.base)
        print(f"\ncompose up to /health 200 through nginx: {time.monotonic() - started:.1f} s")
        yield stack
    finally:
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            stack("down", "--volumes", "--timeout", str(GRACEFUL_TIMEOUT + 5), timeout=180)


def top_label(stack: Stack, colour: str) -> str:
    picture = draw_picture(colour, "circle", size=96, seed=12_345)
    response = requests.post(f"{stack.base}/analyze", files={"file": ("p.png", encode(picture, "PNG"))},
                             timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0]["label"]


def docker_time(stamp: str) -> datetime:
    """docker's RFC 3339 times, whose nanoseconds Python's datetime cannot read."""
    seconds, _, fraction = stamp.rstrip("Z").partition(".")
    whole = datetime.fromisoformat(seconds).replace(tzinfo=UTC)
    return whole + timedelta(seconds=float(f"0.{fraction or 0}"))


def test_compose_starts_nginx_once_both_instances_are_ready(docker, stack):
    nginx_started = docker_time(docker.inspect(stack.container("nginx"), "{{.State.StartedAt}}"))
    for instance in ("clip-1", "clip-2"):
        container = stack.container(instance)
        assert docker.inspect(container, "{{.State.Health.Status}}") == "healthy"
        logs = docker.run("logs", "--timestamps", container)
        ready = [line.split()[0] for line in (logs.stdout + logs.stderr).splitlines() if " Ready: " in line]
        assert ready, logs.stderr[-2000:]
        assert docker_time(ready[0]) < nginx_started, (instance, ready[0], nginx_started)
    assert requests.get(f"{stack.base}/health", timeout=10).json()["status"] == "healthy"


def test_compose_names_a_red_picture_red_through_nginx(stack):
    assert top_label(stack, "red") == "red"
    assert top_label(stack, "blue") == "blue"


def test_compose_answers_after_an_instance_is_killed(docker, stack):
    victim = stack.container("clip-1")
    os.kill(int(docker.inspect(victim, "{{.State.Pid}}")), signal.SIGKILL)  # a crash, not `docker stop`
    killed = time.monotonic()
    answers = [top_label(stack, "red") for _ in range(20)]
    assert answers == ["red"] * 20
    # The restart policy brings it back, and its health check passes again.
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        restarts = int(docker.inspect(victim, "{{.RestartCount}}"))
        if restarts >= 1 and docker.inspect(victim, "{{.State.Health.Status}}") == "healthy":
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"clip-1 did not come back: {docker.inspect(victim, '{{json .State}}')}")
    print(f"\ncompose: clip-1 SIGKILLed; 20 requests through nginx all named red; clip-1 restarted "
          f"and healthy again after {time.monotonic() - killed:.1f} s")
    assert top_label(stack, "red") == "red"
