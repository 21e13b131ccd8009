"""vocabulary/watcher.py: CLIP_LABELS_WATCH notices a changed, added or removed label file or prompts
file, reloads once per change, and retries a reload that failed."""

from __future__ import annotations

import threading

from clip_service.vocabulary.watcher import LabelsWatcher, labels_signature
from tests.support.waiting import wait_for


def test_the_signature_changes_with_any_label_file_or_the_prompts(tmp_path):
    labels, prompts = tmp_path / "labels", tmp_path / "prompts.txt"
    labels.mkdir()
    (labels / "animals.txt").write_text("cat\n")
    prompts.write_text("a photo of a {}.\n")
    (labels / "notes.md").write_text("not a label file")
    first = labels_signature(labels, prompts)
    (labels / "notes.md").write_text("still not a label file, and longer")
    assert labels_signature(labels, prompts) == first
    signatures = [first]
    for change in (lambda: (labels / "animals.txt").write_text("cat\ndog\n"),
                   lambda: (labels / "foods.txt").write_text("pizza\n"),
                   lambda: prompts.write_text("art of the {}.\n"),
                   lambda: (labels / "foods.txt").unlink(),
                   lambda: prompts.unlink()):
        change()
        signatures.append(labels_signature(labels, prompts))
    assert len(set(signatures)) == len(signatures), "every change shows"


def test_the_watcher_reloads_on_a_change_and_retries_a_failed_reload(tmp_path):
    labels, prompts = tmp_path / "labels", tmp_path / "prompts.txt"
    labels.mkdir()
    (labels / "animals.txt").write_text("cat\n")
    calls, outcomes = [], iter([False, True])
    lock = threading.Lock()

    def reload() -> bool:
        with lock:
            calls.append(labels_signature(labels, prompts))
            return next(outcomes, True)

    watcher = LabelsWatcher(labels, prompts, reload, interval=0.02)
    watcher.start()
    try:
        assert not wait_for(lambda: calls, timeout=0.2), "no change, no reload"
        (labels / "animals.txt").write_text("cat\nzebra\n")
        assert wait_for(lambda: len(calls) >= 2, timeout=5), "the failed reload was not retried"
        settled = len(calls)
        assert not wait_for(lambda: len(calls) > settled, timeout=0.2), "a reload that worked is not repeated"
    finally:
        watcher.stop()
    (labels / "animals.txt").write_text("cat\nzebra\nlion\n")
    assert not wait_for(lambda: len(calls) > settled, timeout=0.2), "a stopped watcher reloads nothing"


def test_the_watcher_outlives_a_reload_that_raises(tmp_path):
    labels, prompts = tmp_path / "labels", tmp_path / "prompts.txt"
    labels.mkdir()
    (labels / "animals.txt").write_text("cat\n")
    calls = []

    def reload() -> bool:
        calls.append(len(calls))
        if len(calls) == 1:
            raise UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid continuation byte")
        return True

    watcher = LabelsWatcher(labels, prompts, reload, interval=0.02)
    watcher.start()
    try:
        (labels / "animals.txt").write_text("cat\nzebra\n")
        assert wait_for(lambda: len(calls) >= 2, timeout=5), "the watcher died with the first reload"
    finally:
        watcher.stop()
