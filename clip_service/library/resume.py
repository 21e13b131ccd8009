"""Reading an existing output back for --resume: which paths it records, and where its whole records end.

An output is JSON lines (an object with a "path" a line) or CSV (a header, then rows whose first field
is the path). A run that was interrupted leaves at most an unfinished last record.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator

from clip_service.library.csv_cells import from_spreadsheet_safe
from clip_service.library.errors import LibraryError


def split_lines(text: str) -> list[str]:
    """text split after each `\\n` only (CSV fields may hold `\\r`, and JSON strings U+2028 or U+0085,
    which str.splitlines() would split at too)."""
    parts = text.split("\n")
    return [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def _jsonl_records(text: str) -> Iterator[tuple[str | None, int]]:
    """(path, character offset after the record) per line: "" for a blank line, None if unreadable."""
    offset = 0
    for line in split_lines(text):
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


def _csv_records(text: str, header: list[str]) -> Iterator[tuple[str | None, int]]:
    """Like _jsonl_records for CSV: "" for the header, which must come first; a row may span lines."""
    consumed = 0

    def feed() -> Iterator[str]:
        nonlocal consumed
        for line in split_lines(text):
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
        if first and row != header and consumed < len(text):
            raise LibraryError(f"the first line is not the tagger's CSV header {','.join(header)}")
        if first and row == header:
            yield "", consumed
        else:
            yield (from_spreadsheet_safe(row[0]) if row and len(row) == len(header) and row[0] else None,
                   consumed)
        first = False


def scan_existing(text: str, fmt: str, csv_header: list[str] | None = None) -> tuple[set[str], int]:
    """The paths an existing output records, and how many characters of it are whole records.

    Only the end may be unfinished, as an interrupted run leaves it: it is dropped and that file done
    again. An unreadable record anywhere else means the file is not (only) ours, so it is refused
    rather than appended to. CSV needs the header its rows follow.
    """
    records = _jsonl_records(text) if fmt == "jsonl" else _csv_records(text, csv_header or [])
    paths: set[str] = set()
    good_end = 0
    for number, (path, end) in enumerate(records, 1):
        if path is None or text[end - 1:end] != "\n":
            if end >= len(text):
                break  # the unfinished tail
            raise LibraryError(f"record {number} is not a {fmt} tagger record")
        if path:
            paths.add(path)
        good_end = end
    return paths, good_end
