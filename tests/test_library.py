"""The library pieces the tagger (and, next, the index) share: output locking and the read-ahead pipeline."""

from __future__ import annotations

import threading

import pytest

from clip_service.library.errors import LibraryError
from clip_service.library.output import OutputSpec, open_output
from clip_service.library.pipeline import prefetch

HEADER = ["path", "labels", "confidences", "emoji"]


def test_a_second_run_on_the_same_output_is_refused(tmp_path):
    spec = OutputSpec(tmp_path / "tags.jsonl", "jsonl", HEADER, resume=True)
    with open_output(spec) as (handle, done):
        handle.write('{"path": "a.jpg"}\n')
        with pytest.raises(LibraryError, match="being written by another tagger run"), open_output(spec):
            pass
    with open_output(spec) as (_, done):  # released with the first run
        assert done == {"a.jpg"}


def test_a_csv_output_starts_with_its_header_once(tmp_path):
    spec = OutputSpec(tmp_path / "tags.csv", "csv", HEADER, resume=True)
    for _ in range(2):
        with open_output(spec):
            pass
    assert (tmp_path / "tags.csv").read_bytes() == b"path,labels,confidences,emoji\r\n"


def test_prefetch_keeps_order_and_works_at_most_a_window_ahead():
    started: list[int] = []
    lock = threading.Lock()
    ahead = []

    def work(item: int) -> int:
        with lock:
            started.append(item)
        return item * item

    results = []
    for item, result in prefetch(work, range(20), workers=2, ahead=3):
        with lock:
            ahead.append(len(started) - item)
        results.append((item, result))
    assert results == [(item, item * item) for item in range(20)]
    assert max(ahead) <= 3, "more items were read ahead than the window allows"
