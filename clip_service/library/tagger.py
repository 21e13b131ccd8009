"""Tag a whole photo library with the server's engine, labels and settings: the `tag` command's run.

`python -m clip_service tag FOLDER` (see `clip_service.cli`) lands here. Nothing here needs Flask or a
running server: the model is loaded in this process, and every file goes through the same reading,
decoding and scoring code as the server's `file=` input, so a tag here is the tag the server would give.

Output is one record per image, JSON lines or CSV, written and flushed as each batch is done. A run that
is interrupted (Ctrl-C, kill, a crash) therefore loses at most the batch in progress, and `--resume`
picks up where it stopped (library.output and library.resume).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import torch

from clip_service.engines.base import Engine
from clip_service.engines.registry import default_batch_size, engine_for_settings, may_run_on_gpu
from clip_service.inputs.images import ImageLimits
from clip_service.library.batches import BatchWork, Summary, process_files
from clip_service.library.cluster import RAY_BATCH_SIZE, Loaded, process_on_ray
from clip_service.library.errors import LibraryError
from clip_service.library.output import OutputSpec, csv_line, open_output
from clip_service.library.walk import find_pending, record_key
from clip_service.settings import Settings
from clip_service.tasks.classify import Classifier, Prediction
from clip_service.vocabulary.emoji import EmojiMapper, emoji_mapper
from clip_service.vocabulary.reload import load_vocabulary

log = logging.getLogger(__name__)

FORMATS = ("jsonl", "csv")
CSV_HEADER = ["path", "labels", "confidences", "emoji"]


@dataclass(frozen=True)
class TagOptions:
    folder: Path
    output: Path | None  # None: standard output
    fmt: str = "jsonl"
    threshold: float = 0.01
    limit: int = 10
    all_files: bool = False
    resume: bool = False
    overwrite: bool = False
    progress: bool = False
    batch_size: int = 0  # images per forward pass; 0: the server's default for the device
    ray: str | None = None  # tag on the Ray cluster at this address (library/cluster.py)
    ray_engines: int = 0  # actors, each with an engine; 0: one per CPUS_PER_ENGINE CPUs of each node
    emoji_api: bool = False  # with ray: each actor asks the emoji API once, as load_classifier does


# --- records -----------------------------------------------------------------------------------------


def make_record(path: str, predictions: list[Prediction]) -> dict:
    """One image's record: parallel lists, best label first; emoji None where no emoji is known."""
    return {"path": path,
            "labels": [prediction.label for prediction in predictions],
            "confidences": [prediction.confidence for prediction in predictions],
            "emoji": [prediction.emoji for prediction in predictions]}


def format_record(record: dict, fmt: str) -> str:
    """A record as one JSON line, or one CSV row with the lists joined by `;`."""
    if fmt == "jsonl":
        return json.dumps(record, ensure_ascii=False) + "\n"
    return csv_line([record["path"], ";".join(record["labels"]),
                     ";".join(str(confidence) for confidence in record["confidences"]),
                     ";".join(emoji or "" for emoji in record["emoji"])])


def csv_header() -> str:
    return csv_line(CSV_HEADER)


# --- the model ---------------------------------------------------------------------------------------


def cli_emoji(settings: Settings, use_api: bool = False) -> EmojiMapper:
    """The emoji mapper for a tagger run: the local dictionary, and the API only when asked.

    The server's background thread is never started: a batch run should neither wait for the API nor
    switch mappings halfway through. With use_api, the API is asked once (at most API_TIMEOUT per
    step) and, if it answers, its entries win as they do on the server.
    """
    mapper = emoji_mapper(settings)
    if use_api:
        mapper.fetch_once()
    return mapper


def build_classifier(settings: Settings, engine: Engine, emoji: EmojiMapper) -> Classifier:
    """A classifier for this process: the engine with the settings' vocabulary, images encoded directly."""
    return Classifier(engine, load_vocabulary(settings, engine), emoji)


def load_classifier(settings: Settings, emoji_api: bool = False) -> Classifier:
    """The server's engine and label features, built in this process (label features come cached)."""
    engine = engine_for_settings(settings)
    return build_classifier(settings, engine, cli_emoji(settings, emoji_api))


# --- the run -----------------------------------------------------------------------------------------


def tag_files(options: TagOptions, pending: list[Path], classifier: Classifier, limits: ImageLimits,
              output: IO[str], summary: Summary) -> None:
    """Classify the pending files a batch at a time and write each record as soon as its batch is done.

    A bad file is logged and counted. An interruption loses at most the batch in progress, which a
    resumed run tags again.
    """
    process_files(options.folder, pending, classify_work(classifier, options), limits,
                  classifier.engine.input_size, options.batch_size or default_batch_size(classifier.engine),
                  record_writer(options, output), summary, options.progress)


def classify_work(classifier: Classifier, options: TagOptions) -> BatchWork:
    def classify(inputs: list[torch.Tensor]) -> list[list[Prediction]]:
        return classifier.classify_prepared(inputs, options.threshold, options.limit)

    return BatchWork(classifier.engine.prepare, classify, lambda model_input: classify([model_input])[0])


def record_writer(options: TagOptions,
                  output: IO[str]) -> Callable[[list[tuple[Path, list[Prediction]]]], None]:
    """Writes a batch's records and flushes them."""
    def write(done: list[tuple[Path, list[Prediction]]]) -> None:
        for relative, predictions in done:
            output.write(format_record(make_record(record_key(relative), predictions), options.fmt))
        output.flush()

    return write


def tag_on_ray(options: TagOptions, settings: Settings, pending: list[Path], limits: ImageLimits,
               output: IO[str], summary: Summary) -> None:
    """tag_files on the Ray cluster at options.ray: each actor loads the classifier once; the records are
    written here as batches arrive."""
    def load(threads: int) -> Loaded:
        torch.set_num_threads(threads)
        classifier = load_classifier(settings, options.emoji_api)
        return Loaded(classify_work(classifier, options), classifier.engine.input_size)

    nodes = process_on_ray(options.ray, options.folder, pending, load, limits,
                           options.batch_size or RAY_BATCH_SIZE, record_writer(options, output), summary,
                           engines=options.ray_engines,
                           gpus=may_run_on_gpu(settings.backend, settings.device, settings.precision))
    log.info("Tagged on %d Ray nodes", len(nodes))


def run(options: TagOptions, settings: Settings, classifier_loader: Callable[[], Classifier]) -> Summary:
    """Tag every pending file under options.folder; the model is loaded only if there is work.

    Ctrl-C (KeyboardInterrupt) ends the run cleanly: the summary says `interrupted` and the output
    holds every record finished so far.
    """
    if not options.folder.is_dir():
        raise LibraryError(f"{options.folder} is not a folder")
    summary = Summary("tagged")
    spec = OutputSpec(options.output, options.fmt, CSV_HEADER, options.resume, options.overwrite)
    with open_output(spec) as (output, done):
        own = (options.output,) if options.output else ()
        candidates, pending = find_pending(options.folder, options.all_files, done, own)
        summary.done = len(candidates) - len(pending)
        log.info("%d of %d files to tag, writing to %s", len(pending), len(candidates),
                 options.output or "standard output")
        if not pending:
            return summary
        classifier = None if options.ray else classifier_loader()
        limits = ImageLimits.of(settings)
        started = time.perf_counter()
        try:
            if classifier is None:
                tag_on_ray(options, settings, pending, limits, output, summary)
            else:
                tag_files(options, pending, classifier, limits, output, summary)
        except KeyboardInterrupt:
            summary.interrupted = True
        summary.seconds = time.perf_counter() - started
    return summary
