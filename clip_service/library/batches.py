"""Working through a library's pending files a batch at a time: shared by `tag` and `index`.

Files are read, decoded and turned into the model's input ahead on threads (pipeline.prefetch), so only
model-sized inputs wait for the model, never full-size photos; they go through the model a batch at a time
(one forward pass; one image at a time only when a batch fails, so one odd image costs no others), and
each result is handed on as soon as its batch is done. Unreadable files are reported and counted, a
progress bar shows the rate, and Ctrl-C loses at most the batch in progress.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from PIL import Image
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from clip_service.inputs.images import ImageLimits
from clip_service.library.pipeline import DECODE_AHEAD, prefetch, read_image

log = logging.getLogger(__name__)

I = TypeVar("I")  # noqa: E741  a model input, as `prepare` makes it
R = TypeVar("R")


@dataclass
class Summary:
    """Counts for the final line; updated as the run goes, so an interrupted run still reports them."""

    verb: str = "tagged"  # what was done to each file, for the summary line
    processed: int = 0
    skipped: int = 0
    done: int = 0  # already in the output before this run
    seconds: float = 0.0
    interrupted: bool = False

    def line(self) -> str:
        rate = self.processed / self.seconds if self.seconds > 0 else 0.0
        return (f"{self.verb} {self.processed}, skipped {self.skipped}, already done {self.done} "
                f"in {self.seconds:.1f} s ({rate:.1f} images/s)")

    @property
    def exit_code(self) -> int:
        """1 when there was something to do and none of it could be done, or nothing was found."""
        return 1 if self.processed == 0 and self.done == 0 else 0


@dataclass(frozen=True)
class BatchWork(Generic[I, R]):
    """What a run does with its images: each made the model's input on the thread that decoded it,
    then a batch of inputs in one pass, or one input alone (the fallback)."""

    prepare: Callable[[Image.Image], I]
    batch: Callable[[list[I]], list[R]]
    one: Callable[[I], R]


def in_batch_or_alone(work: BatchWork[I, R], inputs: list[I]) -> list[R | str]:
    """Each input's result or why not; one forward pass unless one input breaks it."""
    if not inputs:
        return []
    try:
        if len(inputs) > 1:
            return list(work.batch(inputs))
    except Exception:  # one odd image must not cost the others: fall back to one at a time
        log.debug("A batch of %d failed; trying its images one by one", len(inputs), exc_info=True)
    outcomes: list[R | str] = []
    for one_input in inputs:
        try:
            outcomes.append(work.one(one_input))
        except Exception as error:  # e.g. an image shape the model cannot take
            outcomes.append(f"{type(error).__name__}: {error}")
    return outcomes


def process_files(folder: Path, pending: list[Path], work: BatchWork[I, R], limits: ImageLimits,
                  draft_size: tuple[int, int] | None, batch_size: int,
                  finished: Callable[[list[tuple[Path, R]]], None], summary: Summary,
                  progress: bool, beneath_folder: bool = False) -> None:
    """Read, batch and process the pending files (relative to folder); `finished` gets each batch's
    (path, result) pairs as soon as it is done. A bad file is logged and counted in `summary`.
    `beneath_folder`: files are read only beneath the (resolved) folder, links out of it skipped."""
    batch: list[tuple[Path, I]] = []
    beneath = folder.resolve() if beneath_folder else None

    def read(relative: Path) -> tuple[I | None, str | None]:
        return read_image(folder / relative, limits, draft_size, beneath, work.prepare)

    def skip(relative: Path, problem: str) -> None:
        log.warning("Skipped %s: %s", relative, problem)
        summary.skipped += 1
        bar.set_postfix(skipped=summary.skipped, refresh=False)
        bar.update()

    def flush() -> None:
        outcomes = in_batch_or_alone(work, [model_input for _, model_input in batch])
        done = []
        for (relative, _), outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, str):
                skip(relative, outcome)
            else:
                done.append((relative, outcome))
        if done:
            finished(done)
            summary.processed += len(done)
            bar.update(len(done))
        batch.clear()

    bar = tqdm(total=len(pending), unit="img", disable=not progress, dynamic_ncols=True)
    try:
        # Log lines go above the bar instead of through it (only while there is a bar: the redirect
        # adds a console handler even where logging had none).
        redirect = logging_redirect_tqdm() if progress else contextlib.nullcontext()
        results = prefetch(read, pending, ahead=DECODE_AHEAD + batch_size)
        with redirect, contextlib.closing(results):
            for relative, (model_input, problem) in results:
                if model_input is None:
                    skip(relative, problem)
                    continue
                batch.append((relative, model_input))
                if len(batch) >= batch_size:
                    flush()
            flush()
    finally:
        bar.close()
