"""Checks that run once before serving, in the process that starts the server.

Under gunicorn they run in the master, before any worker forks, so an invalid setting or missing
weights stop start-up with one clear line instead of a crash loop of workers. No CUDA is touched.
"""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

from clip_service.engines.base import ModelLoadError
from clip_service.engines.spec import model_identity
from clip_service.engines.weights import fetch_weights
from clip_service.library.photo_index import PhotoIndexError, read_model_index
from clip_service.settings import Settings, SettingsError, load_settings
from clip_service.vocabulary.labels import LabelsError, load_labels, load_templates


def preflight() -> Settings:
    """Validated settings whose labels load, whose weights are on disk (downloading them) and whose
    photo index (SEARCH_INDEX) was made with CLIP_MODEL."""
    settings = load_settings()
    warn_if_others_can_write(settings.cache_dir)
    load_labels(settings.labels_dir)
    load_templates(settings.prompts_file, settings.prompt_template)
    fetch_weights(settings.model_spec)
    if settings.search_index is not None:
        try:
            read_model_index(settings.search_index, settings.clip_model, model_identity(settings.model_spec))
        except PhotoIndexError as error:
            raise PhotoIndexError(f"SEARCH_INDEX: {error}") from None
    return settings


def warn_if_others_can_write(cache_dir: Path) -> None:
    """The cache holds what the workers run (OpenVINO's converted model, the label features), checked
    against damage but not signed: a folder others can write lets them change the model served."""
    try:
        info = cache_dir.stat()
    except OSError:
        return  # made later, by the service, with its own umask
    if info.st_mode & 0o022 or info.st_uid != os.geteuid():
        print(f"clip-service: warning: CLIP_CACHE_DIR={cache_dir} can be written by others (mode "
              f"{stat.S_IMODE(info.st_mode):o}, owner uid {info.st_uid}, the service runs as uid "
              f"{os.geteuid()}); "
              "whoever can write it can change the model the service runs: chmod go-w, or a folder of the "
              "service user's own", file=sys.stderr, flush=True)


def preflight_or_exit() -> Settings:
    try:
        return preflight()
    except (SettingsError, LabelsError, ModelLoadError, PhotoIndexError) as error:
        print(f"clip-service: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


# Workers per GPU when WORKERS=0: the per-request Python work (HTTP, decoding, scoring) runs under one
# GIL per worker, so one worker cannot keep a GPU busy (issue 10: 273 req/s with one worker, 405 with
# two, on a 2-core machine with a model that costs nothing). Each worker holds its own model copy
# (ViT-B/32 fp16: ~0.3 GB, ViT-L/14: ~0.9 GB, plus ~0.5 GB of CUDA context and its batches).
MAX_WORKERS_PER_GPU = 4


def default_workers(on_gpu: bool, cpu_count: int) -> int:
    """gunicorn workers for WORKERS=0: one on a CPU (one model, every core for its inference threads);
    on a GPU one per CPU core, at most MAX_WORKERS_PER_GPU (this instance uses one GPU)."""
    if not on_gpu:
        return 1
    return max(1, min(MAX_WORKERS_PER_GPU, cpu_count))


def serves_on_gpu(settings: Settings) -> bool:
    """Whether the workers will run the model on a GPU, found without initialising CUDA in the master
    (torch.cuda.device_count asks NVML first, which survives the fork)."""
    if settings.backend == "openvino" or settings.precision == "int8" or settings.device in ("cpu", "mps"):
        return False
    if settings.device.startswith("cuda"):
        return True
    import torch

    return torch.cuda.device_count() > 0


def worker_count(settings: Settings) -> int:
    return settings.workers or default_workers(serves_on_gpu(settings), os.cpu_count() or 1)


def reload_on_sighup(service) -> None:
    """SIGHUP reloads what `service.reload` reloads (labels, templates, the photo index), on a thread of
    its own: a signal handler must not wait for file reads or the model. One reload for CLIP.sh's
    workers and REST.py alike."""
    import signal
    import threading

    def reload(signum, frame):
        threading.Thread(target=service.reload, name="clip-reload", daemon=True).start()

    signal.signal(signal.SIGHUP, reload)
