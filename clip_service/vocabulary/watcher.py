"""CLIP_LABELS_WATCH: reload when a file in the labels folder or the prompts file changes.

Polling the files' size and modification time every couple of seconds works on every file system
(network mounts and containers included) and costs nothing noticeable.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def labels_signature(labels_dir: Path, prompts_file: Path) -> tuple:
    """(path, mtime, size) of every label file and the prompts file: changes when any of them does."""
    paths = sorted(Path(labels_dir).glob("*.txt")) + [Path(prompts_file)]
    signature = []
    for path in paths:
        with contextlib.suppress(OSError):
            stat = path.stat()
            signature.append((str(path), stat.st_mtime_ns, stat.st_size))
    return tuple(signature)


class LabelsWatcher:
    """A thread that calls `reload` when the files change, until `stop`; a failed reload is retried."""

    def __init__(self, labels_dir: Path, prompts_file: Path, reload: Callable[[], bool],
                 interval: float = 2.0):
        self.labels_dir = labels_dir
        self.prompts_file = prompts_file
        self.reload = reload
        self.interval = interval
        self._stopped = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._run, args=(self._signature(),), name="clip-labels-watch",
                         daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def _signature(self) -> tuple:
        return labels_signature(self.labels_dir, self.prompts_file)

    def _run(self, last: tuple) -> None:
        while not self._stopped.wait(self.interval):
            try:
                current = self._signature()
                if current != last and self.reload():
                    last = current
            except Exception:  # the watcher outlives any one failed look or reload
                log.exception("CLIP_LABELS_WATCH: looking for label changes failed; trying again")
