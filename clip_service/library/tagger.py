"""Tag a whole photo library with the server's engine, labels and settings: the `tag` command's run.

`python -m clip_service tag FOLDER` (see `clip_service.cli`) lands here. Nothing here needs Flask or a
running server: the model is loaded in this process, and every file goes through the same reading,
decoding and scoring code as the server's `file=` input, so a tag here is the tag the server would give.

Output is one record per image, JSON lines or CSV, written and flushed as each batch is done. A run that
is interrupted (Ctrl-C, kill, a crash) therefore loses at most the batch in progress, and `--resume`
picks up where it stopped (library.output and library.resume).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from clip_service.engines.base import Engine
from clip_service.engines.registry import default_batch_size, engine_for_settings
from clip_service.inputs.images import ImageLimits
from clip_service.library.errors import LibraryError
from clip_service.library.output import OutputSpec, csv_line, open_output
from clip_service.library.pipeline import DECODE_AHEAD, prefetch, read_image
from clip_service.library.walk import IMAGE_EXTENSIONS, find_candidates, record_key
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


@dataclass
class Summary:
    """Counts for the final line; updated as the run goes, so an interrupted run still reports them."""

    tagged: int = 0
    skipped: int = 0
    done: int = 0  # already in the output before this run
    seconds: float = 0.0
    interrupted: bool = False

    def line(self) -> str:
        rate = self.tagged / self.seconds if self.seconds > 0 else 0.0
        return (f"tagged {self.tagged}, skipped {self.skipped}, already done {self.done} "
                f"in {self.seconds:.1f} s ({rate:.1f} images/s)")

    @property
    def exit_code(self) -> int:
        """1 when there was something to tag and none of it could be, or nothing to tag was found."""
        return 1 if self.tagged == 0 and self.done == 0 else 0


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
    draft_size = classifier.engine.input_size
    batch_size = options.batch_size or default_batch_size(classifier.engine)
    batch: list[tuple[Path, Image.Image]] = []

    def read(relative: Path) -> tuple[Image.Image | None, str | None]:
        return read_image(options.folder / relative, limits, draft_size)

    def skip(relative: Path, problem: str) -> None:
        log.warning("Skipped %s: %s", relative, problem)
        summary.skipped += 1
        bar.set_postfix(skipped=summary.skipped, refresh=False)
        bar.update()

    def flush() -> None:
        for relative, outcome in classify_batch(classifier, batch, options):
            if isinstance(outcome, str):
                skip(relative, outcome)
                continue
            output.write(format_record(make_record(record_key(relative), outcome), options.fmt))
            summary.tagged += 1
            bar.update()
        output.flush()
        batch.clear()

    bar = tqdm(total=len(pending), unit="img", disable=not options.progress, dynamic_ncols=True)
    try:
        # Log lines go above the bar instead of through it (only while there is a bar: the redirect
        # adds a console handler even where logging had none).
        redirect = logging_redirect_tqdm() if options.progress else contextlib.nullcontext()
        results = prefetch(read, pending, ahead=DECODE_AHEAD + batch_size)
        with redirect, contextlib.closing(results):
            for relative, (image, problem) in results:
                if image is None:
                    skip(relative, problem)
                    continue
                batch.append((relative, image))
                if len(batch) >= batch_size:
                    flush()
            flush()
    finally:
        bar.close()


def classify_batch(classifier: Classifier, batch: list[tuple[Path, Image.Image]], options: TagOptions,
                   ) -> list[tuple[Path, list[Prediction] | str]]:
    """(path, predictions or why not) for each image; one forward pass unless one image breaks it."""
    if not batch:
        return []
    images = [image for _, image in batch]
    try:
        if len(images) > 1:
            results = classifier.classify_many(images, options.threshold, options.limit)
            return [(relative, predictions)
                    for (relative, _), predictions in zip(batch, results, strict=True)]
    except Exception:  # one odd image must not cost the others: fall back to one at a time
        log.debug("A batch of %d failed; classifying its images one by one", len(images), exc_info=True)
    outcomes: list[tuple[Path, list[Prediction] | str]] = []
    for relative, image in batch:
        try:
            outcomes.append((relative, classifier.classify(image, options.threshold, options.limit)))
        except Exception as error:  # e.g. an image shape the model cannot take
            outcomes.append((relative, f"{type(error).__name__}: {error}"))
    return outcomes


def run(options: TagOptions, settings: Settings, classifier_loader: Callable[[], Classifier]) -> Summary:
    """Tag every pending file under options.folder; the model is loaded only if there is work.

    Ctrl-C (KeyboardInterrupt) ends the run cleanly: the summary says `interrupted` and the output
    holds every record finished so far.
    """
    if not options.folder.is_dir():
        raise LibraryError(f"{options.folder} is not a folder")
    summary = Summary()
    spec = OutputSpec(options.output, options.fmt, CSV_HEADER, options.resume, options.overwrite)
    with open_output(spec) as (output, done):
        candidates = find_candidates(options.folder, options.all_files, options.output)
        pending = [relative for relative in candidates if record_key(relative) not in done]
        summary.done = len(candidates) - len(pending)
        if not candidates:
            log.warning("No %s found under %s", "files" if options.all_files else
                        f"image files ({', '.join(sorted(IMAGE_EXTENSIONS))}; --all-files tries every "
                        "file)", options.folder)
        log.info("%d of %d files to tag, writing to %s", len(pending), len(candidates),
                 options.output or "standard output")
        if not pending:
            return summary
        classifier = classifier_loader()
        limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels)
        started = time.perf_counter()
        try:
            tag_files(options, pending, classifier, limits, output, summary)
        except KeyboardInterrupt:
            summary.interrupted = True
        summary.seconds = time.perf_counter() - started
    return summary
