"""`tag` and `index` on a Ray cluster (`--ray ADDRESS`): the same run, its batches spread over machines.

The driver (this process) does everything a single-machine run does (lock, walk, --resume, journal or
output, summary); only the batches leave it. Ray Data splits the pending paths into batches and feeds
them to a pool of actors, one per engine's worth of CPUs on the cluster's nodes, each holding one
engine loaded once (as a server worker does): an actor reads, decodes and prepares its batch's files on
its own threads with the single-machine code (library/batches.py), runs the model, and hands back each
file's result or why it could not be read. The driver writes results as they stream in.

A node lost mid-run costs no photo: Ray Data's actor pool restarts the actor elsewhere and runs the lost
batches again (its defaults: max_restarts and max_task_retries -1; actors spread over the nodes).
None is written twice either: a batch's results reach the driver once, and the output is keyed by path
(the index keeps one vector per path). Ray is optional (requirements-cluster.txt) and never imported
by the server. Every node must see FOLDER at the same path (shared storage) and have this package,
its requirements and the model (CLIP_MODEL) installed.
"""

from __future__ import annotations

import logging
import os
import pickle
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clip_service.inputs.images import ImageLimits
from clip_service.library.batches import BatchWork, Summary, in_batch_or_alone
from clip_service.library.errors import LibraryError
from clip_service.library.pipeline import DECODE_AHEAD, prefetch, read_image

log = logging.getLogger(__name__)

INSTALL = "pip install -r requirements-cluster.txt"
CPUS_PER_ENGINE = 4  # a core group per engine, as the server's workers take one; fewer on small nodes
RAY_BATCH_SIZE = 16  # paths per actor call: one forward pass on a CPU engine, few enough to lose


def import_ray():
    """Ray, or a LibraryError that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise LibraryError(f"--ray needs Ray, which is not installed: {sys.executable} -m {INSTALL} (on "
                           "every node of the cluster as well)") from None
    return ray


@dataclass(frozen=True)
class Loaded:
    """What an actor runs: built once per actor from a `load()` the driver sends it."""

    work: BatchWork
    draft_size: tuple[int, int] | None


class BatchActor:
    """One engine, loaded once; each call takes a batch of paths and returns each one's outcome."""

    def __init__(self, load: Callable[[int], Loaded], folder: str, limits: ImageLimits,
                 beneath_folder: bool, threads: int):
        self.loaded = load(threads)
        self.folder = Path(folder)
        self.beneath = self.folder.resolve() if beneath_folder else None
        self.limits = limits

    def read(self, relative: Path) -> tuple[Any, str | None]:
        """The model's input, made on the decoding thread within the decode budget (as a single-machine
        run does), or why not."""
        return read_image(self.folder / relative, self.limits, self.loaded.draft_size, self.beneath,
                          self.loaded.work.prepare)

    def __call__(self, batch: dict) -> dict:
        import ray

        paths = [Path(os.fsdecode(bytes(raw))) for raw in batch["path"]]
        prepared = list(prefetch(self.read, paths, ahead=DECODE_AHEAD + len(paths)))
        readable = [model_input for _, (model_input, _) in prepared if model_input is not None]
        outcomes = iter(in_batch_or_alone(self.loaded.work, readable))
        results, problems = [], []
        for _, (model_input, problem) in prepared:
            outcome = next(outcomes) if model_input is not None else problem
            failed = isinstance(outcome, str)
            results.append(b"" if failed else pickle.dumps(outcome))
            problems.append(outcome if failed else "")
        node = ray.get_runtime_context().get_node_id()
        return {"path": batch["path"], "result": results, "problem": problems, "node": [node] * len(paths)}


def connect(ray, address: str) -> bool:
    """Join the cluster at `address` (`local` starts one here); True if this call connected."""
    if ray.is_initialized():
        return False
    ours = signal.getsignal(signal.SIGTERM)  # the command's: SIGTERM ends the run like Ctrl-C
    try:
        ray.init(address=None if address == "local" else address, log_to_driver=False,
                 logging_level=logging.WARNING, configure_logging=False)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise LibraryError(f"--ray {address}: cannot join the cluster ({error}); start one with `ray start "
                           "--head`, or give `local` to start one here") from None
    finally:
        signal.signal(signal.SIGTERM, ours)  # ray.init puts its own, which aborts the process
    return True


@dataclass(frozen=True)
class Slots:
    """How the engines spread over the cluster: `actors` of them, each reserving `cpus` CPUs (its
    decoding and, without a GPU, its model threads) and `gpus` GPUs (0 or 1)."""

    actors: int
    cpus: int
    gpus: int = 0


def engine_slots(ray, engines: int = 0, gpus: bool = False) -> Slots:
    """An engine per GPU of the cluster when `gpus` (the engine may run on one) and the nodes have any,
    with the node's CPUs shared among its GPUs' engines for decoding (as a GPU server's worker takes a
    core group); else an engine per CPUS_PER_ENGINE CPUs of each node (fewer CPUs each on smaller
    nodes). `engines`: that many instead, spread over the nodes."""
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    with_gpus = [node for node in nodes if gpus and int(node.get("GPU", 0)) >= 1]
    if with_gpus:
        cpus = max(1, min(CPUS_PER_ENGINE, min(int(node.get("CPU", 0) // int(node["GPU"]))
                                               for node in with_gpus)))
        return Slots(engines or sum(int(node["GPU"]) for node in with_gpus), cpus, 1)
    cpu_counts = [node.get("CPU", 0) for node in nodes]
    cpus = max(1, min(CPUS_PER_ENGINE, int(min(cpu_counts, default=1))))
    return Slots(engines or max(1, sum(int(count // cpus) for count in cpu_counts)), cpus)


def quiet_ray_data(ray) -> None:
    """No progress lines from Ray Data every few seconds: the summary line says what was done."""
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def process_on_ray(address: str, folder: Path, pending: list[Path], load: Callable[[int], Loaded],
                   limits: ImageLimits, batch_size: int, finished: Callable[[list[tuple[Path, Any]]], None],
                   summary: Summary, beneath_folder: bool = False, engines: int = 0,
                   gpus: bool = False) -> set[str]:
    """process_files on a cluster: `finished` gets each batch's (path, result) pairs as they arrive, a
    bad file is logged and counted in `summary`. `gpus`: the engine may run on a GPU (engine_slots).
    Returns the ids of the nodes that did work."""
    ray = import_ray()
    connected = connect(ray, address)
    try:
        quiet_ray_data(ray)
        slots = engine_slots(ray, engines, gpus)
        log.info("Ray: %d engines of %d CPUs%s each for %d files", slots.actors, slots.cpus,
                 " and a GPU" if slots.gpus else "", len(pending))
        dataset = ray.data.from_items([{"path": os.fsencode(path)} for path in pending])
        outcomes = dataset.map_batches(
            BatchActor, batch_size=batch_size, batch_format="numpy", num_cpus=slots.cpus,
            num_gpus=slots.gpus, compute=ray.data.ActorPoolStrategy(size=slots.actors),
            fn_constructor_args=(load, str(folder), limits, beneath_folder, slots.cpus))
        nodes: set[str] = set()
        batches = iter(outcomes.iter_batches(batch_size=None, batch_format="numpy"))
        try:
            collect(batches, finished, summary, nodes)
        finally:
            # Stops Ray Data's executor now, not when the generator is collected: after ray.shutdown()
            # its threads would touch the shut-down worker, and Ray then ends the process (exit 1,
            # not the interrupted run's 130, when SIGTERM or Ctrl-C stopped the loop)
            batches.close()
        return nodes
    finally:
        if connected:
            ray.shutdown()


def collect(batches, finished: Callable[[list[tuple[Path, Any]]], None], summary: Summary,
            nodes: set[str]) -> None:
    """Hand each batch's results to `finished` as it arrives; log and count the files it could not read."""
    for batch in batches:
        done = []
        for raw, result, problem, node in zip(batch["path"], batch["result"], batch["problem"],
                                              batch["node"], strict=True):
            relative = Path(os.fsdecode(bytes(raw)))
            nodes.add(str(node))
            if problem:
                log.warning("Skipped %s: %s", relative, problem)
                summary.skipped += 1
            else:
                done.append((relative, pickle.loads(result)))
        if done:
            finished(done)
            summary.processed += len(done)
