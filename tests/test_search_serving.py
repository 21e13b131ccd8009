"""Photo search end to end: `python -m clip_service index` makes the index, CLIP.sh serves /search on it.

The colour-trained model (tests/trained_clip.py) must find red pictures for "a red circle" through the
real server, and thumbnails come only from the indexed folder.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from clip_service.library.photo_index import read_index
from tests.support.server import clean_environment, start, stop, wait_healthy
from tests.support.trained_clip import COLOURS, draw_picture, write_pictures

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parent.parent
PER_COLOUR = 6


def index_command(model: str, folder: Path, output: Path, cache: Path) -> None:
    # the engine of the test servers (clip_sh_env), so the index holds exactly what their /embed gives
    env = clean_environment({"CLIP_MODEL": model, "CLIP_CACHE_DIR": str(cache), "CLIP_DEVICE": "cpu",
                             "CLIP_BACKEND": "torch", "PYTHONPATH": str(ROOT)})
    command = [sys.executable, "-m", "clip_service", "index", str(folder), "-o", str(output), "-q"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


@pytest.fixture(scope="module")
def library(trained_model_dir, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("served-search")
    folder = root / "photos"
    write_pictures(folder, COLOURS, PER_COLOUR, fmt="JPEG")
    output = root / "photos.clipindex"
    index_command(f"local-dir:{trained_model_dir}", folder, output, root / "cache")
    return folder, output


def test_search_through_clip_sh(server_env, library, trained_model_dir, tmp_path):
    folder, index = library
    served_index = tmp_path / "served.clipindex"  # rewritten below, so a copy
    shutil.copyfile(index, served_index)
    env = {**server_env, "CLIP_MODEL": f"local-dir:{trained_model_dir}", "SEARCH_INDEX": str(served_index),
           "ALLOWED_FILE_ROOTS": str(folder)}
    port = int(env["PORT"])
    base = f"http://127.0.0.1:{port}"
    process = start(env, tmp_path / "search.log")
    try:
        wait_healthy(port, process)
        answer = requests.get(f"{base}/search", params={"q": "a red circle", "k": 5}, timeout=30)
        assert answer.status_code == 200, answer.text
        matches = answer.json()["matches"]
        assert [match["path"].split("/")[0] for match in matches] == ["red"] * 5
        assert str(folder) not in answer.text

        blue = io.BytesIO()
        draw_picture("blue", "circle", 96, seed=31337).save(blue, "PNG")
        like = requests.post(f"{base}/search", params={"k": 3}, files={"file": ("q.png", blue.getvalue())},
                             timeout=30)
        assert [match["path"].split("/")[0] for match in like.json()["matches"]] == ["blue"] * 3

        thumbnail = requests.get(f"{base}/search/thumbnail", params={"path": matches[0]["path"]}, timeout=30)
        assert thumbnail.status_code == 200 and thumbnail.headers["Content-Type"] == "image/jpeg"
        assert max(Image.open(io.BytesIO(thumbnail.content)).size) <= 256
        for path in ("../photos.clipindex", "/etc/passwd", "red/../../photos.clipindex"):
            refused = requests.get(f"{base}/search/thumbnail", params={"path": path}, timeout=30)
            assert refused.status_code == 404 and refused.json()["status"] == "error"

        # the index holds exactly what /embed gives for the same file
        row = read_index(index)
        served = requests.get(f"{base}/embed", params={"file": str(folder / "green/1.jpg")}, timeout=30)
        np.testing.assert_allclose(np.array(served.json()["embeddings"][0]),
                                   row.embeddings[row.row_of["green/1.jpg"]], atol=1e-5)

        metrics = requests.get(f"{base}/metrics", timeout=10).text
        assert re.search(r'^clip_search_index_images\{pid="\d+"\} ' + f"{float(len(COLOURS) * PER_COLOUR)}$",
                         metrics, re.MULTILINE), metrics
        assert 'clip_stage_seconds_count{stage="search"} 2.0' in metrics
        assert 'clip_requests_total{input="text",route="/search",status="200"} 1.0' in metrics

        # indexed again (a smaller folder), then SIGHUP: the worker serves the new index, no restart
        smaller = tmp_path / "smaller"
        write_pictures(smaller, ["red", "blue"], 2, fmt="JPEG")
        new_index = tmp_path / "new.clipindex"
        index_command(f"local-dir:{trained_model_dir}", smaller, new_index, tmp_path / "cache")
        os.replace(new_index, served_index)
        os.kill(process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 30
        while (images := requests.get(f"{base}/search/index", timeout=10).json()["index"]["images"]) != 4:
            assert time.monotonic() < deadline, f"still {images} images 30 s after SIGHUP"
            time.sleep(0.2)
        assert process.poll() is None
    finally:
        assert stop(process) == 0


def test_an_index_of_another_model_stops_start_up_with_one_line(server_env, library, tmp_path):
    process = start({**server_env, "SEARCH_INDEX": str(library[1])}, tmp_path / "refused.log")  # tiny model
    assert process.wait(timeout=60) == 2
    last = (tmp_path / "refused.log").read_text().strip().splitlines()[-1]
    assert last.startswith("clip-service: SEARCH_INDEX: ")
    assert "was indexed with CLIP_MODEL=local-dir:" in last
    assert "--overwrite" in last
