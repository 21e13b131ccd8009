"""Requests whose cost a client chooses, against CLIP.sh: many long `labels=`, and huge 16-bit images.

The text tower here is real and as slow as a small CLIP's (256 wide, 6 layers), so encoding hundreds
of long labels really takes seconds; the image tower stays tiny.
"""

from __future__ import annotations

import copy
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from tests.support.images import encode, image_bytes
from tests.support.models import TINY_CONFIG, write_tiny_clip
from tests.support.server import start, stop, wait_healthy, worker_pids

pytestmark = pytest.mark.system

TEXT_HEAVY_CONFIG = copy.deepcopy(TINY_CONFIG)
TEXT_HEAVY_CONFIG["text_cfg"].update(width=256, heads=4, layers=6)
CJK_LABELS = ["".join(chr(0x4E00 + (index * 64 + offset) % 20000) for offset in range(64))
              for index in range(100)]


@pytest.fixture(scope="module")
def text_heavy_model_dir(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("text-heavy-clip"), model_cfg=TEXT_HEAVY_CONFIG)


def serve(env: dict, log: Path):
    process = start(env, log)
    wait_healthy(int(env["PORT"]), process, log_path=log)
    return process, f"http://127.0.0.1:{env['PORT']}"


def four_at_once(base: str, labels: list[str]) -> list[tuple[int, float, str]]:
    data = image_bytes("PNG", (64, 64), (200, 30, 30))
    results = []

    def one():
        began = time.monotonic()
        response = requests.post(f"{base}/analyze", data={"labels": ",".join(labels)},
                                 files={"file": ("a.png", data)}, timeout=120)
        results.append((response.status_code, time.monotonic() - began,
                        response.json().get("error", {}).get("message", "")))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_costly_labels_are_refused_or_bounded(server_env, text_heavy_model_dir, tmp_path):
    """100 new 64-character CJK labels, four requests at once, REQUEST_TIMEOUT=2.

    Encoding all of them takes several seconds even on an idle machine, so one request is cut.
    """
    env = {**server_env, "CLIP_MODEL": f"local-dir:{text_heavy_model_dir}", "REQUEST_TIMEOUT": "2"}
    env.pop("THREADS")
    process, base = serve(env, tmp_path / "default.log")
    try:
        refused = four_at_once(base, CJK_LABELS)
        health = requests.get(f"{base}/health", timeout=5)
        fine = requests.post(f"{base}/analyze", params={"labels": "red,green,blue"},
                             files={"file": ("a.png", image_bytes())}, timeout=30)
    finally:
        stop(process)
    print(f"\nLABELS_TOKEN_BUDGET=4096: {[(status, round(seconds, 2)) for status, seconds, _ in refused]}")
    assert [status for status, _, _ in refused] == [400] * 4
    assert all("LABELS_TOKEN_BUDGET" in message for _, _, message in refused)
    assert max(seconds for _, seconds, _ in refused) < 1.0, "refused before any encoding"
    assert health.status_code == 200 and fine.status_code == 200

    env = {**env, "LABELS_TOKEN_BUDGET": "10000000", "PORT": str(int(env["PORT"]) + 1)}
    process, base = serve(env, tmp_path / "unbounded.log")
    try:
        bounded = four_at_once(base, CJK_LABELS)
        health = requests.get(f"{base}/health", timeout=5)
    finally:
        stop(process)
    print(f"LABELS_TOKEN_BUDGET=10000000: {[(status, round(seconds, 2)) for status, seconds, _ in bounded]}")
    statuses = sorted(status for status, _, _ in bounded)
    assert statuses == [504] * 4, "one encodes until its deadline; the others, asking the same, wait for it"
    assert max(seconds for _, seconds, _ in bounded) < 2 + 1, "no answer later than REQUEST_TIMEOUT + 1 s"
    assert health.status_code == 200


def sixteen_bit_png(side: int = 7745) -> bytes:
    values = np.zeros((side, side), dtype=np.uint16)
    values[::7, ::5] = 60000
    return encode(values, "PNG")


def worker_peak_kilobytes(master_pid: int) -> int:
    """Peak resident memory (VmHWM) of the gunicorn master's one worker."""
    children = worker_pids(master_pid)
    assert len(children) == 1, children
    status = Path(f"/proc/{children.pop()}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))


def test_four_huge_16_bit_images_at_once_cost_little_more_than_rgb(server_env, tmp_path):
    """Four concurrent 7745 x 7745 16-bit PNGs (about 130 KB each) through CLIP.sh's defaults."""
    data = sixteen_bit_png()
    env = {**server_env, "REQUEST_TIMEOUT": "30"}
    env.pop("THREADS")
    process, base = serve(env, tmp_path / "bit-depth.log")
    gunicorn_pid = process.pid  # CLIP.sh execs gunicorn: this is its master
    try:
        requests.post(f"{base}/analyze", files={"file": ("warm.png", image_bytes())}, timeout=30)
        before = worker_peak_kilobytes(gunicorn_pid)
        results = []

        def one():
            began = time.monotonic()
            response = requests.post(f"{base}/analyze", files={"file": ("deep.png", data)}, timeout=60)
            results.append((response.status_code, time.monotonic() - began))

        threads = [threading.Thread(target=one) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        grown = (worker_peak_kilobytes(gunicorn_pid) - before) / 1024
    finally:
        stop(process)
    rgb, source = 7745 * 7745 * 4 / 2**20, 7745 * 7745 * 2 / 2**20  # Pillow's RGB: 4 bytes a pixel
    print(f"\nfour 16-bit {len(data) // 1024} KB PNGs at once: {[(s, round(t, 1)) for s, t in results]}; "
          f"the worker's peak memory grew {grown:.0f} MB (one image: {source:.0f} MB at 16 bits, "
          f"{rgb:.0f} MB in RGB)")
    assert [status for status, _ in results] == [200] * 4
    assert grown < 4 * 1.2 * (source + rgb), "each image costs its source and its RGB, little else"


def test_sixteen_16_bit_bombs_at_once_stay_within_the_decode_budget(server_env, tmp_path):
    """Sixteen concurrent 7745 x 7745 16-bit PNGs (about 120 KB each; 5 GB of decoding before the
    budget) through CLIP.sh's defaults with REQUEST_TIMEOUT=5, and a normal photo every 0.3 s meanwhile:
    the worker holds at most DECODE_MEMORY_MB (1024) of decodes, every bomb is answered by the deadline
    (decoded, refused 503 with Retry-After, or 504), and the photos are not held up."""
    data = sixteen_bit_png()
    photo = image_bytes("PNG", (640, 480), (30, 160, 40))
    env = {**server_env, "REQUEST_TIMEOUT": "5"}
    env.pop("THREADS")
    process, base = serve(env, tmp_path / "bombs.log")
    bombs, photos, done = [], [], threading.Event()
    try:
        requests.post(f"{base}/analyze", files={"file": ("warm.png", photo)}, timeout=30)
        before = worker_peak_kilobytes(process.pid)

        def bomb():
            began = time.monotonic()
            response = requests.post(f"{base}/analyze", files={"file": ("deep.png", data)}, timeout=60,
                                     headers={"Connection": "close"})
            bombs.append((response.status_code, time.monotonic() - began,
                          response.headers.get("Retry-After")))

        def normal():
            while not done.is_set():
                began = time.monotonic()
                response = requests.post(f"{base}/analyze", files={"file": ("photo.png", photo)},
                                         timeout=60, headers={"Connection": "close"})
                photos.append((response.status_code, round(time.monotonic() - began, 2)))
                done.wait(0.3)

        threads = [threading.Thread(target=bomb) for _ in range(16)]
        for thread in threads:
            thread.start()
        meanwhile = threading.Thread(target=normal)
        meanwhile.start()
        for thread in threads:
            thread.join()
        done.set()
        meanwhile.join()
        grown = (worker_peak_kilobytes(process.pid) - before) / 1024
    finally:
        stop(process)
    print(f"\nsixteen 16-bit {len(data) // 1024} KB PNGs at once: "
          f"{sorted((s, round(t, 1)) for s, t, _ in bombs)}; the worker's peak memory grew {grown:.0f} MB; "
          f"photos meanwhile: {photos}")
    assert len(bombs) == 16 and {status for status, _, _ in bombs} <= {200, 503, 504}, bombs
    assert {200, 504} & {status for status, _, _ in bombs}, "the budget lets some bombs start, not none"
    assert all(seconds <= 5 + 1 for _, seconds, _ in bombs), bombs
    assert all(retry for status, _, retry in bombs if status == 503), "a 503 says when to retry"
    assert grown <= 1.5 * 1024, f"the worker grew {grown:.0f} MB"
    assert photos and all(status == 200 and seconds <= 3 for status, seconds in photos), photos
