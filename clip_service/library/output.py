"""The output file of a library run: opened to append, locked, emptied or resumed, or standard output.

Output files hold file names exactly as the file system gives them: a name that is not valid UTF-8
keeps its bytes (Python's surrogateescape) instead of failing the run or matching nothing on resume.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from clip_service.library.csv_cells import spreadsheet_safe
from clip_service.library.errors import LibraryError
from clip_service.library.lock import lock_exclusive
from clip_service.library.resume import scan_existing

log = logging.getLogger(__name__)

ENCODING, ERRORS = "utf-8", "surrogateescape"


@dataclass(frozen=True)
class OutputSpec:
    """Where records go and how an existing file is treated."""

    path: Path | None  # None: standard output
    fmt: str  # "jsonl" or "csv"
    csv_header: list[str]  # the CSV's first row (CSV only)
    resume: bool = False
    overwrite: bool = False


def csv_line(row: list[str]) -> str:
    """One CSV row as text, spreadsheet-safe, quoted where needed, ending in \r\n (the csv default)."""
    buffer = io.StringIO()
    csv.writer(buffer).writerow([spreadsheet_safe(cell) for cell in row])
    return buffer.getvalue()


@contextlib.contextmanager
def open_output(spec: OutputSpec) -> Iterator[tuple[IO[str], set[str]]]:
    """The output, ready to append to, and the paths it already records (for --resume).

    The file is opened without truncating and locked before anything is read or cut, so a second run
    on the same output fails instead of interleaving with (or wiping) the first.
    """
    if spec.path is None:
        if spec.resume:
            raise LibraryError("--resume needs an --output file, not standard output")
        yield from _stdout(spec)
        return
    path = spec.path
    if path.is_dir():
        raise LibraryError(f"--output {path} is a folder")
    if path.exists() and not (spec.resume or spec.overwrite):
        raise LibraryError(f"{path} exists; pass --resume to skip the files it records and append to it, "
                           "or --overwrite to start it again")
    try:
        raw = open(path, "a+b")  # noqa: SIM115 (closed by the wrapper below)
    except OSError as error:
        raise LibraryError(f"cannot open --output {path}: {error.strerror}") from None
    with io.TextIOWrapper(raw, encoding=ENCODING, errors=ERRORS, newline="", write_through=True) as handle:
        lock_exclusive(raw, path)
        done = _prepare(raw, spec)
        if spec.fmt == "csv" and raw.tell() == 0:
            handle.write(csv_line(spec.csv_header))
            handle.flush()
        yield handle, done


def _stdout(spec: OutputSpec) -> Iterator[tuple[IO[str], set[str]]]:
    """Standard output with the file's encoding; detached afterwards so sys.stdout stays open."""
    sys.stdout.flush()
    handle = io.TextIOWrapper(sys.stdout.buffer, encoding=ENCODING, errors=ERRORS, newline="",
                              write_through=True)
    try:
        if spec.fmt == "csv":
            handle.write(csv_line(spec.csv_header))
            handle.flush()
        yield handle, set()
    finally:
        handle.flush()
        handle.detach()


def _prepare(raw: IO[bytes], spec: OutputSpec) -> set[str]:
    """Empty the file (--overwrite), or read its records and cut an unfinished end (--resume)."""
    if not spec.resume:
        raw.truncate(0)
        return set()
    raw.seek(0)
    text = raw.read().decode(ENCODING, ERRORS)
    try:
        done, good_end = scan_existing(text, spec.fmt, spec.csv_header)
    except LibraryError as error:
        raise LibraryError(f"cannot resume {spec.path}: {error}; is it a {spec.fmt} output of this "
                           "tagger? (--format, or --overwrite to start again)") from None
    if good_end < len(text):
        log.warning("%s ends with an unfinished record (an interrupted run); removing it and tagging "
                    "that file again", spec.path)
        raw.truncate(len(text[:good_end].encode(ENCODING, ERRORS)))
    raw.seek(0, os.SEEK_END)
    return done
