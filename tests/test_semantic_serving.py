"""The right label wins through CLIP.sh (gunicorn), on a model trained to name colours.

tests/support/trained_clip.py trains a tiny CLIP that names the colour of unseen pictures 99 % of the time,
so every path of the real server can be held to the RIGHT answer: each input kind, draft-decoded
JPEGs, micro-batches of mixed colours, `groups=` and `labels=`, label reloads (SIGHUP and the file
watcher), the label-feature cache on a second start, and bf16. Three server starts in all: the
module's server (fp32), a second start on its cache (watching the label files), and a bf16 start.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from threading import Barrier

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from clip_service.inputs.images import ImageLimits, decode_image
from tests.support.http_fixtures import free_port
from tests.support.images import encode
from tests.support.server import clip_sh_env, start, stop, wait_healthy
from tests.support.trained_clip import COLOURS, assert_mostly_named, unseen_pictures, write_labels

pytestmark = pytest.mark.system

FIRST_COLOURS = [colour for colour in COLOURS if colour != "purple"]  # purple arrives by a reload
# animals.txt sorts first, so the colours' rows do not start at 0: a misaligned group shows.
LABEL_FILES = {"animals": ["cat", "dog"], "colours": FIRST_COLOURS}
FIRST_LABELS = len(LABEL_FILES["animals"]) + len(FIRST_COLOURS)


@dataclass
class ColourServer:
    base: str
    process: object
    root: Path
    labels_dir: Path
    log: Path
    env: dict
    pictures: list[tuple[str, bytes]]  # (colour, PNG) seen by the baseline
    baseline: list[list[dict]]  # predictions for `pictures` right after start-up


def colour_env(model_dir: Path, root: Path, labels_dir: Path, emoji_file: Path, **extra) -> dict:
    """CLIP.sh on the trained model in fp32, sixteen threads, url= to 127.0.0.1, file= under root."""
    return clip_sh_env(f"local-dir:{model_dir}", labels_dir, emoji_file, root / "cache", api_port=9,
                       api_timeout=0.5, URL_ALLOWLIST="127.0.0.1", ALLOWED_FILE_ROOTS=root, WORKERS=1,
                       THREADS=16, CLIP_PRECISION="fp32", HEALTH_CANARY_SECONDS=0,
                       # torch: the bf16 test holds it to sharing fp32's label cache (its text tower
                       # stays fp32); OpenVINO on the trained model: test_openvino_engine.py
                       CLIP_BACKEND="torch", **extra)


def upload(base: str, data: bytes, **params) -> requests.Response:
    response = requests.post(f"{base}/analyze", params=params, files={"file": ("picture", data)}, timeout=60)
    assert response.status_code == 200, response.text
    return response


def predictions(response: requests.Response) -> list[dict]:
    return response.json()["predictions"]


def named(response: requests.Response) -> str:
    return predictions(response)[0]["label"]


def png_pictures(colours, per_colour: int, first_seed: int) -> list[tuple[str, bytes]]:
    return [(colour, encode(picture, "PNG"))
            for colour, _, picture in unseen_pictures(colours, per_colour, first_seed=first_seed)]


def wait_for_label(base: str, label: str, timeout: float = 30) -> dict:
    """/labels once it lists `label` (a reload swaps the vocabulary in the background)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listing = requests.get(f"{base}/labels", timeout=10).json()
        if any(item["label"] == label for group in listing["groups"].values() for item in group):
            return listing
        time.sleep(0.2)
    raise AssertionError(f"{label} did not appear in /labels within {timeout} s")


@pytest.fixture(scope="module")
def colour_server(trained_model_dir, tmp_path_factory, emoji_file):
    """CLIP.sh on the trained model with colour labels (purple left out), batches allowed to form."""
    root = tmp_path_factory.mktemp("colour-server")
    labels_dir = write_labels(root / "labels", LABEL_FILES)
    env = colour_env(trained_model_dir, root, labels_dir, emoji_file, BATCH_MAX_SIZE=8, BATCH_WAIT_MS=200)
    process = start(env, root / "server.log")
    base = f"http://127.0.0.1:{env['PORT']}"
    try:
        wait_healthy(int(env["PORT"]), process, log_path=root / "server.log")
        pictures = png_pictures(FIRST_COLOURS, 2, first_seed=10_000)
        baseline = [predictions(upload(base, data)) for _, data in pictures]
        yield ColourServer(base, process, root, labels_dir, root / "server.log", env, pictures, baseline)
    finally:
        assert stop(process) == 0


def test_upload_url_and_file_each_name_the_colour(colour_server, local_server):
    server = colour_server
    results = []
    for number, ((colour, data), baseline) in enumerate(zip(server.pictures, server.baseline, strict=True)):
        path = server.root / f"picture-{number}.png"
        path.write_bytes(data)
        local_server.routes[f"/{number}.png"] = (200, {"Content-Type": "image/png"}, data)
        by_upload = upload(server.base, data)
        by_url = requests.get(f"{server.base}/analyze", params={"url": local_server.url(f"/{number}.png")},
                              timeout=60)
        by_file = requests.get(f"{server.base}/analyze", params={"file": str(path)}, timeout=60)
        for response in (by_url, by_file):
            assert response.status_code == 200, response.text
            assert predictions(response) == predictions(by_upload)  # same picture, same answer
        assert predictions(by_upload) == baseline
        results.append((colour, named(by_upload)))
        # threshold 0 and 9 labels: every label is answered, the colours' among them
        assert {p["label"] for p in predictions(by_upload)} == {"cat", "dog", *FIRST_COLOURS}
    assert_mostly_named(results)
    assert len(local_server.hits) == len(server.pictures)


def test_large_jpegs_are_draft_decoded_and_still_named_right(colour_server):
    pictures = [(colour, encode(picture, "JPEG", quality=90))
                for colour, _, picture in unseen_pictures(FIRST_COLOURS, 2, size=1600, first_seed=20_000)]
    # The decoder the server uses reads these at 1/8 scale for a 64-pixel model: 200 x 200.
    assert decode_image(pictures[0][1], ImageLimits(8 << 20, 60_000_000), (64, 64)).size == (200, 200)
    assert_mostly_named((colour, named(upload(colour_server.base, data))) for colour, data in pictures)


def batch_counts(base: str) -> tuple[float, float, float]:
    """clip_batch_size: (forward passes, images, passes of one image) so far."""
    samples = {}
    for family in text_string_to_metric_families(requests.get(f"{base}/metrics", timeout=10).text):
        if family.name == "clip_batch_size":
            for sample in family.samples:
                samples[(sample.name, sample.labels.get("le"))] = sample.value
    return (samples[("clip_batch_size_count", None)], samples[("clip_batch_size_sum", None)],
            samples[("clip_batch_size_bucket", "1.0")])


def test_concurrent_requests_of_mixed_colours_each_get_their_own_colour(colour_server):
    """Requests share forward passes (BATCH_WAIT_MS=200), and each answer is its own picture's."""
    pictures = png_pictures(FIRST_COLOURS, 4, first_seed=30_000)
    passes, images, single = batch_counts(colour_server.base)
    together = Barrier(len(pictures))

    def send(data: bytes) -> str:
        together.wait(timeout=30)
        return named(upload(colour_server.base, data))

    with ThreadPoolExecutor(len(pictures)) as pool:
        answers = list(pool.map(send, [data for _, data in pictures]))
    after_passes, after_images, after_single = batch_counts(colour_server.base)
    assert after_images - images == len(pictures)
    batched_passes = (after_passes - passes) - (after_single - single)
    assert batched_passes >= 1 and after_passes - passes < len(pictures), "no batch of two or more formed"
    assert_mostly_named(zip([colour for colour, _ in pictures], answers, strict=True))


def test_eight_threads_sending_the_same_new_labels_all_get_right_answers(colour_server):
    """A pipeline's thread pool sends its own label set (all eight colours, new to the worker: this
    test runs before any other sends it) from 8 threads at once, 96 requests: the first ones wait for
    the one encoding of the set instead of being refused (38 of 96 were 503 before)."""
    pictures = png_pictures(COLOURS, 12, first_seed=50_000)
    every_colour = ",".join(COLOURS)
    together = Barrier(8)
    statuses = []

    def send(share: list[tuple[str, bytes]]) -> list[tuple[str, str]]:
        together.wait(timeout=30)
        answers = []
        for colour, data in share:
            response = requests.post(f"{colour_server.base}/analyze", data={"labels": every_colour},
                                     files={"file": ("picture", data)}, timeout=60)
            statuses.append(response.status_code)
            answers.append((colour, named(response) if response.status_code == 200 else ""))
        return answers

    with ThreadPoolExecutor(8) as pool:
        answers = [pair for share in pool.map(send, [pictures[index::8] for index in range(8)])
                   for pair in share]
    assert statuses == [200] * len(pictures), sorted(statuses)
    assert_mostly_named(answers)


def test_groups_and_labels_options_pick_the_right_label(colour_server):
    base = colour_server.base
    answers = []
    for colour, data in colour_server.pictures:
        only_colours = predictions(upload(base, data, groups="colours"))
        assert {p["label"] for p in only_colours} == set(FIRST_COLOURS)
        answers.append((colour, only_colours[0]["label"]))
        assert {p["label"] for p in predictions(upload(base, data, groups="animals"))} == {"cat", "dog"}
    assert_mostly_named(answers)

    # labels= scores against the request's own labels, here one the vocabulary lacks: purple
    purple = png_pictures(["purple"], 3, first_seed=40_000)
    for _, data in purple:
        first = predictions(upload(base, data, labels="purple,blue,pink"))
        again = predictions(upload(base, data, labels="pink,purple,blue"))
        assert {p["label"] for p in first} == {"purple", "blue", "pink"}
        assert {p["label"]: p["confidence"] for p in first} == {p["label"]: p["confidence"] for p in again}
    every_colour = ",".join(COLOURS)
    mixed = png_pictures(COLOURS, 2, first_seed=41_000)
    assert_mostly_named((colour, named(upload(base, data, labels=every_colour))) for colour, data in mixed)
    assert_mostly_named([("purple", named(upload(base, data, labels="blue,purple,pink")))
                         for _, data in purple], at_least=0.6)


def test_sighup_reload_makes_purple_a_label(colour_server):
    server = colour_server
    purple = png_pictures(["purple"], 3, first_seed=50_000)
    for _, data in purple:  # before: purple is no label, so another colour is named
        assert "purple" not in {p["label"] for p in predictions(upload(server.base, data))}
    with (server.labels_dir / "colours.txt").open("a") as labels:
        labels.write("purple\n")
    os.kill(server.process.pid, signal.SIGHUP)
    listing = wait_for_label(server.base, "purple")
    assert listing["num_labels"] == FIRST_LABELS + 1
    after = png_pictures(COLOURS, 3, first_seed=51_000)  # every colour, to catch mixed-up features
    assert_mostly_named((colour, named(upload(server.base, data))) for colour, data in after)
    assert_mostly_named([("purple", named(upload(server.base, data))) for _, data in purple], at_least=0.6)
    log = server.log.read_text()
    assert "Encoding 1 labels" in log, "a reload encodes only the new label"


def start_on_the_same_cache(server: ColourServer, name: str, **extra) -> tuple[dict, object, Path, Path]:
    """Another CLIP.sh on the module server's cache, with a fresh copy of the first label files."""
    labels_dir = server.root / f"labels-{name}"
    shutil.rmtree(labels_dir, ignore_errors=True)
    write_labels(labels_dir, LABEL_FILES)
    env = {**server.env, "PORT": str(free_port()), "CLIP_LABELS_DIR": str(labels_dir), **extra}
    log = server.root / f"{name}.log"
    process = start(env, log)
    try:
        wait_healthy(int(env["PORT"]), process, log_path=log)
    except BaseException:
        stop(process)
        raise
    return env, process, labels_dir, log


def test_second_start_uses_the_label_cache_and_the_watcher_adds_purple(colour_server):
    server = colour_server
    env, process, labels_dir, log = start_on_the_same_cache(server, "second", CLIP_LABELS_WATCH="True")
    base = f"http://127.0.0.1:{env['PORT']}"
    try:
        started = log.read_text()
        assert f"Loaded {FIRST_LABELS} label features from" in started and "Encoding" not in started
        assert [predictions(upload(base, data)) for _, data in server.pictures] == server.baseline

        purple = png_pictures(["purple"], 3, first_seed=60_000)
        for _, data in purple:
            assert "purple" not in {p["label"] for p in predictions(upload(base, data))}
        with (labels_dir / "colours.txt").open("a") as labels:
            labels.write("purple\n")
        wait_for_label(base, "purple")  # no signal: the watcher saw the file change
        after = png_pictures(COLOURS, 3, first_seed=61_000)
        assert_mostly_named((colour, named(upload(base, data))) for colour, data in after)
        assert_mostly_named([("purple", named(upload(base, data))) for _, data in purple], at_least=0.6)
    finally:
        assert stop(process) == 0
    assert "Labels reloaded: 10 labels" in log.read_text()


def test_bf16_names_the_colours_as_fp32_does(colour_server):
    """CLIP_PRECISION=bf16 runs the image tower in bf16 (slower without AMX, but it works); label
    features stay fp32, so the fp32 server's cache serves it too."""
    server = colour_server
    env, process, _, log = start_on_the_same_cache(server, "bf16", CLIP_PRECISION="bf16")
    base = f"http://127.0.0.1:{env['PORT']}"
    try:
        started = log.read_text()
        assert "on cpu in bf16" in started
        assert f"Loaded {FIRST_LABELS} label features from" in started and "Encoding" not in started
        answers = [predictions(upload(base, data)) for _, data in server.pictures]
    finally:
        assert stop(process) == 0
    assert_mostly_named((colour, answer[0]["label"]) for (colour, _), answer in zip(
        server.pictures, answers, strict=True))
    for answer, fp32 in zip(answers, server.baseline, strict=True):
        fp32_confidence = {p["label"]: p["confidence"] for p in fp32}
        for prediction in answer:  # bf16 keeps about 3 significant digits
            assert prediction["confidence"] == pytest.approx(fp32_confidence[prediction["label"]], abs=0.05)
