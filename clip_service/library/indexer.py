"""Index a photo library for search: the `index` command's run, on the same code as `tag`.

`python -m clip_service index FOLDER -o INDEX` (see clip_service.cli) embeds every image under FOLDER
with the server's engine, reading and decoding each file exactly as the server's `file=` input does, and
writes INDEX (library/photo_index.py). While it runs, each batch's embeddings are appended to a journal
beside INDEX (`INDEX.partial`, JSON lines, flushed per batch): an interrupted run loses at most the batch
in progress, and `--resume` continues from the journal. `--resume` on a finished index embeds only the
images it lacks and drops those no longer in FOLDER. The journal becomes INDEX at the end, with an
approximate (HNSW) index of its vectors when asked or when it holds APPROXIMATE_FROM images or more.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from clip_service.engines.base import Engine
from clip_service.engines.registry import default_batch_size, engine_for_settings, may_run_on_gpu
from clip_service.engines.spec import model_identity
from clip_service.inputs.images import ImageLimits
from clip_service.library.approximate import APPROXIMATE_FROM
from clip_service.library.batches import BatchWork, Summary, process_files
from clip_service.library.cluster import RAY_BATCH_SIZE, Loaded, process_on_ray
from clip_service.library.errors import LibraryError
from clip_service.library.output import OutputSpec, open_output
from clip_service.library.photo_index import PhotoIndex, PhotoIndexError, read_model_index, write_index
from clip_service.library.resume import split_lines
from clip_service.library.walk import find_pending, record_key
from clip_service.settings import Settings
from clip_service.tasks.embed import base64_rows

log = logging.getLogger(__name__)

JOURNAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class IndexOptions:
    folder: Path
    output: Path
    all_files: bool = False
    resume: bool = False
    overwrite: bool = False
    progress: bool = False
    batch_size: int = 0  # images per forward pass; 0: the server's default for the device
    approximate: bool | None = None  # build the HNSW index too; None: from APPROXIMATE_FROM images on
    ray: str | None = None  # embed on the Ray cluster at this address (library/cluster.py)
    ray_engines: int = 0  # actors, each with an engine; 0: one per CPUS_PER_ENGINE CPUs of each node


def journal_path(output: Path) -> Path:
    return output.with_name(output.name + JOURNAL_SUFFIX)


def _model_tag(identity: str) -> str:
    """A short tag of the model written into each journal record, so no run mixes two models' vectors."""
    return hashlib.sha256(identity.encode()).hexdigest()[:16]


def _previous(options: IndexOptions, folder: Path, model: str, identity: str) -> PhotoIndex | None:
    """The finished index to continue (--resume), after checking it fits this run."""
    if not options.output.exists() or not options.resume:
        if options.output.exists() and not options.overwrite:
            raise LibraryError(f"{options.output} exists; pass --resume to add the images it lacks (and drop "
                               "those gone from the folder), or --overwrite to index the folder again")
        return None
    try:
        previous = read_model_index(options.output, model, identity)
    except PhotoIndexError as error:
        raise LibraryError(str(error)) from None
    if previous.folder != folder:
        raise LibraryError(f"{options.output} indexes {previous.folder}, not {folder}; give that folder, or "
                           "another --output")
    return previous


def _journal_records(journal: Path, tag: str) -> dict[str, np.ndarray]:
    """path -> embedding of every whole record in the journal, later records winning."""
    found: dict[str, np.ndarray] = {}
    # whole records only: opening the journal to resume (open_output) cut an unfinished end and refused
    # an unreadable record; a file name may hold U+2028 or U+0085, which json.dumps leaves as they are
    for line in split_lines(journal.read_text(encoding="utf-8", errors="surrogateescape")):
        if not line.strip():
            continue
        record = json.loads(line)
        if record.get("model") != tag:
            raise LibraryError(f"{journal} holds embeddings of another model; pass --overwrite to start "
                               "again")
        found[record["path"]] = np.frombuffer(base64.b64decode(record["embedding"]), dtype="<f4")
    return found


def journal_writer(journal, tag: str) -> Callable[[list[tuple[Path, torch.Tensor]]], None]:
    """Appends a batch's (path, embedding) pairs to the journal and flushes it."""
    def write(done: list[tuple[Path, torch.Tensor]]) -> None:
        vectors = base64_rows(torch.stack([vector for _, vector in done]))
        for (relative, _), vector in zip(done, vectors, strict=True):
            journal.write(json.dumps({"path": record_key(relative), "model": tag, "embedding": vector},
                                     ensure_ascii=False) + "\n")
        journal.flush()

    return write


def embedding_work(engine: Engine) -> BatchWork:
    def batch(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return list(engine.encode_images(torch.stack(inputs)))

    return BatchWork(engine.prepare, batch, lambda model_input: batch([model_input])[0])


def embed_files(engine: Engine, options: IndexOptions, pending: list[Path], limits: ImageLimits,
                journal, tag: str, summary: Summary) -> None:
    """Embed the pending files a batch at a time, appending each batch to the journal when done."""
    process_files(options.folder, pending, embedding_work(engine), limits, engine.input_size,
                  options.batch_size or default_batch_size(engine), journal_writer(journal, tag), summary,
                  options.progress, beneath_folder=True)


def load_on_node(settings: Settings) -> Callable[[int], Loaded]:
    """What each Ray actor runs once: the engine for `settings` on `threads` CPU threads."""
    def load(threads: int) -> Loaded:
        torch.set_num_threads(threads)
        engine = engine_for_settings(settings)
        return Loaded(embedding_work(engine), engine.input_size)

    return load


def embed_on_ray(options: IndexOptions, settings: Settings, pending: list[Path], limits: ImageLimits,
                 journal, tag: str, summary: Summary) -> None:
    """embed_files on the Ray cluster at options.ray: the same journal, written here as batches arrive."""
    write = journal_writer(journal, tag)
    nodes = process_on_ray(options.ray, options.folder, pending, load_on_node(settings), limits,
                           options.batch_size or RAY_BATCH_SIZE, write, summary, beneath_folder=True,
                           engines=options.ray_engines,
                           gpus=may_run_on_gpu(settings.backend, settings.device, settings.precision))
    log.info("Embedded on %d Ray nodes", len(nodes))


def run(options: IndexOptions, settings: Settings, engine_loader: Callable[[], Engine]) -> Summary:
    """Index every pending file under options.folder; the model is loaded only if there is work.

    Ctrl-C (KeyboardInterrupt) ends the run cleanly: the summary says `interrupted`, the journal holds
    every batch finished so far, and INDEX is left as it was.
    """
    if not options.folder.is_dir():
        raise LibraryError(f"{options.folder} is not a folder")
    folder = options.folder.resolve()
    identity = model_identity(settings.model_spec)
    tag = _model_tag(identity)
    previous = _previous(options, folder, settings.clip_model, identity)
    journal = journal_path(options.output)
    summary = Summary("indexed")
    spec = OutputSpec(journal, "jsonl", [], options.resume, options.overwrite)
    with open_output(spec) as (journal_file, journaled):
        done = journaled | set(previous.paths if previous else ())
        candidates, pending = find_pending(folder, options.all_files, done, (options.output, journal))
        summary.done = len(candidates) - len(pending)
        log.info("%d of %d files to index into %s", len(pending), len(candidates), options.output)
        if pending:
            engine = None if options.ray else engine_loader()
            limits = ImageLimits.of(settings)
            started = time.perf_counter()
            try:
                if engine is None:
                    embed_on_ray(options, settings, pending, limits, journal_file, tag, summary)
                else:
                    embed_files(engine, options, pending, limits, journal_file, tag, summary)
            except KeyboardInterrupt:
                summary.interrupted = True
            summary.seconds = time.perf_counter() - started
        if summary.interrupted:
            return summary
        # a link out of the folder is never read now; one an older run indexed leaves the index too
        leaving = {record_key(relative) for relative in candidates if (folder / relative).is_symlink()
                   and not (folder / relative).resolve().is_relative_to(folder)}
        present = {record_key(relative) for relative in candidates} - leaving
        rows = {path: previous.embeddings[row] for path, row in previous.row_of.items() if path in present} \
            if previous else {}
        rows.update(_journal_records(journal, tag))
        gone = sum(path not in present for path in previous.paths) if previous else 0
        if gone:
            log.info("Dropped %d images no longer under %s", gone, folder)
        paths = sorted(path for path in rows if path in present)
        if paths:
            approximate = options.approximate
            if approximate is None:
                approximate = len(paths) >= APPROXIMATE_FROM
            write_index(options.output, folder, settings.clip_model, identity, paths,
                        np.stack([rows[path] for path in paths]), approximate)
    journal.unlink()  # in INDEX now, or there was nothing to index
    return summary
