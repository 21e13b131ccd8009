"""`index --ray` and `tag --ray` on a two-node Ray cluster on this machine (Ray's own
ray.cluster_utils.Cluster): an interrupted run finished by --resume writes the single-machine index and
both nodes did work; tag writes the single-machine records; a node killed mid-run costs no photo and
duplicates none. Each run starts two actors, each loading the model: three runs and a resume, about two
minutes here (1 min 57 s)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from clip_service import cli
from clip_service.engines.registry import load_engine
from clip_service.engines.spec import parse_model_spec
from clip_service.library import cluster as cluster_module
from clip_service.library import indexer
from clip_service.library.indexer import IndexOptions, journal_path
from clip_service.library.photo_index import read_index
from clip_service.settings import Settings
from clip_service.tasks.search import best_matches
from tests.support.server import clean_environment
from tests.support.system import unavailable
from tests.support.trained_clip import COLOURS, write_pictures

ROOT = Path(__file__).resolve().parents[1]
PER_COLOUR = 5
NODE_MEMORY = 100 * 1024 * 1024  # object store per node
# Ray's one-machine mode: every address on loopback (otherwise it swaps 127.0.0.1 for the machine's own
# address, ray/_private/services.py resolve_ip_for_localhost), as tests must
LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
pytestmark = pytest.mark.system


@pytest.fixture(scope="module")
def two_nodes():
    """A head node and a worker node of 1 CPU each, each its own raylet, so the two engines of a run
    (--ray-engines 2) take one node each; on loopback only; the package importable on both
    (PYTHONPATH, as an installed package would be)."""
    saved = {name: os.environ.get(name) for name in (*LOOPBACK_ONLY, "PYTHONPATH")}
    os.environ.update(LOOPBACK_ONLY)  # before Ray is imported: it reads this once
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), saved["PYTHONPATH"]]))
    try:
        from ray.cluster_utils import Cluster
    except ImportError:
        unavailable("Ray is not installed: pip install -r requirements-cluster.txt")
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": NODE_MEMORY})
    worker = nodes.add_node(num_cpus=1, object_store_memory=NODE_MEMORY)
    assert nodes.address.startswith("127.0.0.1:")
    nodes.wait_for_nodes()
    try:
        yield nodes, worker
    finally:
        nodes.shutdown()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cluster") / "photos"
    write_pictures(folder, COLOURS, PER_COLOUR, size=64)
    (folder / "broken.png").write_bytes(b"not a picture")
    return folder


def command_env(model: Path, output: Path, **more: str) -> dict[str, str]:
    return clean_environment({"CLIP_MODEL": f"local-dir:{model}", "CLIP_BACKEND": "torch",
                              "CLIP_CACHE_DIR": str(output.parent / "cache"), "PYTHONPATH": str(ROOT),
                              **LOOPBACK_ONLY, **more})


def index_command(model: Path, address: str, folder: Path, output: Path, *flags: str,
                  command: str = "index", env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "clip_service", command, str(folder), "-o", str(output),
                             "--ray", address, "--ray-engines", "2", "--batch-size", "2", *flags],
                            env=env or command_env(model, output), cwd=ROOT, stderr=subprocess.PIPE,
                            text=True)


def finished(process: subprocess.Popen, timeout: float = 240) -> str:
    _, errors = process.communicate(timeout=timeout)
    return errors


def single_machine(model: Path, folder: Path, output: Path):
    engine = load_engine(parse_model_spec(f"local-dir:{model}"), "cpu", "fp32")
    indexer.run(IndexOptions(folder, output), Settings(clip_model=f"local-dir:{model}"), lambda: engine)
    return read_index(output), engine


def wait_for_batches(process: subprocess.Popen, journal: Path, batches: int) -> None:
    """Until the run's journal holds `batches` records (the run is under way on the cluster)."""
    deadline = time.monotonic() + 240
    while not (journal.exists() and journal.read_text().count("\n") >= batches):
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, "the cluster run wrote nothing in 240 s"
        time.sleep(0.05)


def test_an_interrupted_cluster_run_resumed_equals_the_single_machine_index(two_nodes, photos,
                                                                             trained_model_dir, tmp_path):
    nodes, _ = two_nodes
    output = tmp_path / "ray.clipindex"
    process = index_command(trained_model_dir, nodes.address, photos, output)
    wait_for_batches(process, journal_path(output), 2)
    process.send_signal(signal.SIGTERM)
    errors = finished(process)
    assert process.returncode == cli.EXIT_INTERRUPTED and "--resume" in errors, errors
    assert not output.exists()
    errors = finished(index_command(trained_model_dir, nodes.address, photos, output, "--resume"))
    assert "skipped 1, already done" in errors and "already done 0" not in errors, errors
    assert "Skipped broken.png" in errors  # the unreadable-file report, as on one machine
    assert "Embedded on 2 Ray nodes" in errors  # each batch names the node Ray ran it on
    assert not journal_path(output).exists()
    on_ray = read_index(output)
    alone, engine = single_machine(trained_model_dir, photos, tmp_path / "one.clipindex")
    assert on_ray.paths == alone.paths and on_ray.folder == alone.folder
    np.testing.assert_allclose(on_ray.embeddings, alone.embeddings, atol=1e-5)
    query = engine.encode_texts(["a red circle"])[0].numpy()
    matches = best_matches(on_ray.embeddings, on_ray.paths, query, PER_COLOUR)
    assert all(match.path.startswith("red/") for match in matches), matches


def test_tag_on_two_nodes_writes_the_single_machine_records(two_nodes, photos, trained_model_dir, tmp_path,
                                                              labels_dir):
    nodes, _ = two_nodes
    env = command_env(trained_model_dir, tmp_path / "x", CLIP_LABELS_DIR=str(labels_dir))
    errors = finished(index_command(trained_model_dir, nodes.address, photos, tmp_path / "ray.jsonl",
                                    command="tag", env=env))
    assert "tagged 40, skipped 1" in errors and "Skipped broken.png" in errors, errors
    alone = subprocess.run([sys.executable, "-m", "clip_service", "tag", str(photos), "-o",
                            str(tmp_path / "one.jsonl")], env=env, cwd=ROOT, capture_output=True, text=True)
    assert "tagged 40, skipped 1" in alone.stderr, alone.stderr

    def records(name: str) -> dict[str, dict]:
        lines = (tmp_path / name).read_text().splitlines()
        return {record["path"]: record for record in map(json.loads, lines)}

    on_ray, single = records("ray.jsonl"), records("one.jsonl")
    assert len(on_ray) == 40 and on_ray.keys() == single.keys()
    for path, record in on_ray.items():
        assert record["labels"] == single[path]["labels"]
        np.testing.assert_allclose(record["confidences"], single[path]["confidences"], atol=1e-4)


def test_a_node_killed_mid_run_costs_no_photo_and_duplicates_none(two_nodes, photos, trained_model_dir,
                                                                  tmp_path):
    """Last of the cluster runs here: the worker node, which holds one of the two engines, is killed
    once the run is under way; a spare node joins after, where the lost engine restarts."""
    nodes, doomed = two_nodes
    output = tmp_path / "ray.clipindex"
    process = index_command(trained_model_dir, nodes.address, photos, output)
    wait_for_batches(process, journal_path(output), 2)
    assert not output.exists(), "the run ended before a node could be killed"
    nodes.remove_node(doomed, allow_graceful=False)
    nodes.add_node(num_cpus=1, object_store_memory=NODE_MEMORY)
    errors = finished(process)
    assert process.returncode == 0 and "indexed 40, skipped 1" in errors, errors
    index = read_index(output)
    expected = sorted(str(path.relative_to(photos)) for path in photos.glob("*/*.png"))
    assert list(index.paths) == expected  # each photo once


def test_ray_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(cluster_module.LibraryError, match="pip install -r requirements-cluster.txt"):
        cluster_module.import_ray()


def test_the_server_and_the_commands_never_import_ray():
    """Ray is for --ray only: the server's modules and the command-line tools load without it."""
    code = ("import sys, clip_service.http.app, clip_service.cli, clip_service.library.cluster; "
            "print(sorted(name for name in sys.modules if name == 'ray' or name.startswith('ray.')))")
    env = clean_environment({"PYTHONPATH": str(ROOT)})
    shown = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                           timeout=120)
    assert shown.stdout.strip() == "[]", shown.stdout + shown.stderr
