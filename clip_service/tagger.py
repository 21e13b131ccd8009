"""Tag a whole photo library from the command line, with the server's engine, labels and settings.

`python -m clip_service tag FOLDER` (see `clip_service.__main__`) lands here. Nothing here needs Flask or
a running server: the model is loaded in this process, and every file goes through the same reading,
decoding and scoring code as the server's `file=` input, so a tag here is the tag the server would give.

Output is one record per image, JSON lines or CSV, written and flushed as each image is done. A run that
is interrupted (Ctrl-C, kill, a crash) therefore loses at most the record in progress, and `--resume`
picks up where it stopped: it reads the paths already recorded, drops an unfinished last line, and
appends only what is missing.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

import requests
from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from clip_service.emoji import EmojiMapper
from clip_service.engines.registry import default_batch_size, load_engine
from clip_service.errors import ServiceError
from clip_service.image_input import ImageLimits, decode_image, read_file
from clip_service.scoring import Prediction
from clip_service.service import Classifier, build_classifier, emoji_mapper
from clip_service.settings import Settings

try:
    import fcntl
except ImportError:  # not on Windows: two runs on one output are then not caught
    fcntl = None

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"})
FORMATS = ("jsonl", "csv")
CSV_HEADER = ["path", "labels", "confidences", "emoji"]
# Output files hold file names exactly as the file system gives them: a name that is not valid UTF-8
# keeps its bytes (Python's surrogateescape) instead of failing the run or matching nothing on resume.
ENCODING, ERRORS = "utf-8", "surrogateescape"
DECODE_WORKERS, DECODE_AHEAD = 2, 4

T = TypeVar("T")
R = TypeVar("R")


class TaggerError(Exception):
    """A problem with the arguments, the folder or the output file; the message is one line for the user."""


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


# --- finding the files -------------------------------------------------------------------------------


def find_candidates(folder: Path, all_files: bool = False, exclude: Path | None = None) -> list[Path]:
    """Files under folder, relative to it, sorted by path; hidden folders and files are left out.

    Hidden names are skipped because they are tool droppings (`.thumbnails/`, macOS `._IMG_0001.JPG`
    resource forks), not photos. Symlinked folders are not entered (a link up the tree would loop
    forever); symlinked files are read. `exclude` is the output file, which may live in the folder.
    """
    excluded = exclude.resolve() if exclude is not None else None
    found = []

    def unreadable(error: OSError) -> None:
        log.warning("Cannot list %s: %s", error.filename, error.strerror)

    for root, dirs, files in os.walk(folder, onerror=unreadable):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        for name in files:
            path = Path(root, name)
            if name.startswith(".") or not (all_files or path.suffix.lower() in IMAGE_EXTENSIONS):
                continue
            if excluded is not None and name == excluded.name and path.resolve() == excluded:
                continue
            found.append(path.relative_to(folder))
    return sorted(found, key=lambda path: path.parts)


def record_key(relative: Path) -> str:
    """The `path` written for a file: relative to FOLDER with `/`, so a moved library still resumes."""
    return relative.as_posix()


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
    buffer = io.StringIO()
    csv.writer(buffer).writerow(_csv_row(record))
    return buffer.getvalue()


def _csv_row(record: dict) -> list[str]:
    return [record["path"], ";".join(record["labels"]),
            ";".join(str(confidence) for confidence in record["confidences"]),
            ";".join(emoji or "" for emoji in record["emoji"])]


def csv_header() -> str:
    buffer = io.StringIO()
    csv.writer(buffer).writerow(CSV_HEADER)
    return buffer.getvalue()


# --- reading an existing output for --resume ---------------------------------------------------------


def _lines(text: str) -> list[str]:
    """text split after each `\\n` only (CSV fields may hold `\\r` and other line breaks)."""
    parts = text.split("\n")
    return [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _jsonl_records(text: str) -> Iterator[tuple[str | None, int]]:
    """(path, character offset after the record) per line: "" for a blank line, None if unreadable."""
    offset = 0
    for line in _lines(text):
        offset += len(line)
        if not line.strip():
            yield "", offset
            continue
        try:
            record = json.loads(line)
            path = record.get("path") if isinstance(record, dict) else None
        except ValueError:
            path = None
        yield (path if isinstance(path, str) and path else None), offset


def _csv_records(text: str) -> Iterator[tuple[str | None, int]]:
    """Like _jsonl_records for CSV: "" for our header, which must come first; a row may span lines."""
    consumed = 0

    def feed() -> Iterator[str]:
        nonlocal consumed
        for line in _lines(text):
            consumed += len(line)
            yield line

    reader = csv.reader(feed(), strict=True)
    first = True
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error:
            row = None
        if first and row != CSV_HEADER and consumed < len(text):
            raise TaggerError(f"the first line is not the tagger's CSV header {','.join(CSV_HEADER)}")
        if first and row == CSV_HEADER:
            yield "", consumed
        else:
            yield (row[0] if row and len(row) == len(CSV_HEADER) and row[0] else None), consumed
        first = False


def scan_existing(text: str, fmt: str) -> tuple[set[str], int]:
    """The paths an existing output records, and how many characters of it are whole records.

    Only the end may be unfinished, as an interrupted run leaves it: it is dropped and that file tagged
    again. An unreadable record anywhere else means the file is not (only) ours, so it is refused
    rather than appended to.
    """
    records = _jsonl_records(text) if fmt == "jsonl" else _csv_records(text)
    paths: set[str] = set()
    good_end = 0
    for number, (path, end) in enumerate(records, 1):
        if path is None or text[end - 1:end] != "\n":
            if end >= len(text):
                break  # the unfinished tail
            raise TaggerError(f"record {number} is not a {fmt} tagger record")
        if path:
            paths.add(path)
        good_end = end
    return paths, good_end


# --- the output file ---------------------------------------------------------------------------------


@contextlib.contextmanager
def open_output(options: TagOptions) -> Iterator[tuple[IO[str], set[str]]]:
    """The output, ready to append to, and the paths it already records (for --resume).

    The file is opened without truncating and locked before anything is read or cut, so a second run
    on the same output fails instead of interleaving with (or wiping) the first.
    """
    if options.output is None:
        if options.resume:
            raise TaggerError("--resume needs an --output file, not standard output")
        yield from _stdout(options)
        return
    path = options.output
    if path.is_dir():
        raise TaggerError(f"--output {path} is a folder")
    if path.exists() and not (options.resume or options.overwrite):
        raise TaggerError(f"{path} exists; pass --resume to skip the files it records and append to it, "
                          "or --overwrite to start it again")
    try:
        raw = open(path, "a+b")  # noqa: SIM115 (closed by the wrapper below)
    except OSError as error:
        raise TaggerError(f"cannot open --output {path}: {error.strerror}") from None
    with io.TextIOWrapper(raw, encoding=ENCODING, errors=ERRORS, newline="", write_through=True) as handle:
        _lock(raw, path)
        done = _prepare(raw, path, options)
        if options.fmt == "csv" and raw.tell() == 0:
            handle.write(csv_header())
            handle.flush()
        yield handle, done


def _stdout(options: TagOptions) -> Iterator[tuple[IO[str], set[str]]]:
    """Standard output with the file's encoding; detached afterwards so sys.stdout stays open."""
    sys.stdout.flush()
    handle = io.TextIOWrapper(sys.stdout.buffer, encoding=ENCODING, errors=ERRORS, newline="",
                              write_through=True)
    try:
        if options.fmt == "csv":
            handle.write(csv_header())
            handle.flush()
        yield handle, set()
    finally:
        handle.flush()
        handle.detach()


def _lock(raw: IO[bytes], path: Path) -> None:
    if fcntl is None:
        return
    try:
        fcntl.flock(raw.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise TaggerError(f"{path} is being written by another tagger run") from None


def _prepare(raw: IO[bytes], path: Path, options: TagOptions) -> set[str]:
    """Empty the file (--overwrite), or read its records and cut an unfinished end (--resume)."""
    if not options.resume:
        raw.truncate(0)
        return set()
    raw.seek(0)
    text = raw.read().decode(ENCODING, ERRORS)
    try:
        done, good_end = scan_existing(text, options.fmt)
    except TaggerError as error:
        raise TaggerError(f"cannot resume {path}: {error}; is it a {options.fmt} output of this "
                          "tagger? (--format, or --overwrite to start again)") from None
    if good_end < len(text):
        log.warning("%s ends with an unfinished record (an interrupted run); removing it and tagging "
                    "that file again", path)
        raw.truncate(len(text[:good_end].encode(ENCODING, ERRORS)))
    raw.seek(0, os.SEEK_END)
    return done


# --- classifying -------------------------------------------------------------------------------------


def cli_emoji(settings: Settings, use_api: bool = False) -> EmojiMapper:
    """The emoji mapper for a tagger run: the local dictionary, and the API only when asked.

    The server's background thread is never started: a batch run should neither wait for the API nor
    switch mappings halfway through. With use_api, the API is asked once (at most API_TIMEOUT per
    step) and, if it answers, its entries win as they do on the server.
    """
    mapper = emoji_mapper(settings)
    if use_api:
        try:
            mapper.api = mapper.fetch()
            mapper.api_reachable = True
        except (requests.RequestException, ValueError) as error:
            log.warning("Emoji API %s did not answer (%s); using the local dictionary only",
                        mapper.api_url, error)
    return mapper


def load_classifier(settings: Settings, emoji_api: bool = False) -> Classifier:
    """The server's engine and label features, built in this process (label features come cached)."""
    engine = load_engine(settings.model_spec, settings.device, settings.precision)
    return build_classifier(settings, engine, cli_emoji(settings, emoji_api))


def read_image(path: Path, limits: ImageLimits,
               draft_size: tuple[int, int] | None = None) -> tuple[Image.Image | None, str | None]:
    """(image, None), or (None, why not): the server's file reading and decoding, same limits.

    draft_size is the model's input size, as the server passes it (JPEGs decode at a reduced scale
    that still covers it), so a photo gets the same pixels, and tags, here as there.
    """
    try:
        data = read_file(str(path), path, limits.max_bytes)
        return decode_image(data, limits, draft_size), None
    except ServiceError as error:
        return None, error.message
    except Exception as error:  # a decoder bug on one odd file must not end a library run
        return None, f"{type(error).__name__}: {error}"


def prefetch(function: Callable[[T], R], items: Iterable[T], workers: int = DECODE_WORKERS,
             ahead: int = DECODE_AHEAD) -> Iterator[tuple[T, R]]:
    """(item, function(item)) in order, computing the next few items on threads meanwhile.

    Reading and decoding a camera JPEG takes about as long as classifying it; doing it ahead (Pillow
    and file reads release the GIL) keeps the model busy. The window is bounded, so memory holds at
    most `ahead` decoded images however large the library is.
    """
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tag-read")
    window: deque = deque()
    try:
        for item in items:
            window.append((item, pool.submit(function, item)))
            if len(window) >= ahead:
                first, future = window.popleft()
                yield first, future.result()
        while window:
            first, future = window.popleft()
            yield first, future.result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


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
        raise TaggerError(f"{options.folder} is not a folder")
    summary = Summary()
    with open_output(options) as (output, done):
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
