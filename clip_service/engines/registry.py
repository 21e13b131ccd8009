"""Which engine runs a CLIP_MODEL: CLIP_BACKEND, CLIP_DEVICE and CLIP_PRECISION settled into one.

`auto` picks OpenVINO on a CPU when it is installed (measured faster there: bf16 two to three times
torch fp32, int8 weights for CPUs without bf16, and the text tower for cold starts; bench/RESULTS.md),
and torch with a GPU (CUDA keeps torch fp16) or when OpenVINO is missing. A runtime's module is
imported only when its engine is built, so choosing needs none of them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from clip_service.engines.base import Engine, ModelLoadError
from clip_service.engines.spec import ModelSpec
from clip_service.settings import Settings, openvino_installed

log = logging.getLogger(__name__)


def choose_backend(backend_setting: str, device_setting: str, precision_setting: str) -> str:
    """"torch" or "openvino" for these settings (already validated together by settings.py)."""
    if backend_setting != "auto":
        return backend_setting
    if precision_setting == "int8":
        return "openvino"  # only OpenVINO has it; settings refused int8 without it
    if device_setting not in ("auto", "cpu") or not openvino_installed():
        return "torch"
    if device_setting == "auto":
        from clip_service.engines.torch_engine import resolve_device

        if resolve_device("auto").type != "cpu":  # a GPU: torch fp16 on it
            return "torch"
    return "openvino"


def may_run_on_gpu(backend_setting: str, device_setting: str, precision_setting: str) -> bool:
    """Whether an engine for these settings takes a GPU where its machine has one: what a cluster run
    asks Ray for per engine (library/cluster.py), decided on the driver, which may have no GPU."""
    if device_setting in ("cpu", "mps") or precision_setting == "int8":
        return False
    return backend_setting != "openvino"


def load_engine(spec: ModelSpec, device_setting: str = "auto", precision_setting: str = "auto",
                backend_setting: str = "torch", cache_dir: Path | None = None) -> Engine:
    """The loaded engine for `spec`; raises ModelLoadError.

    backend_setting is CLIP_BACKEND; torch unless given, so tools that only want a model get the
    reference engine. OpenVINO keeps its converted towers under `cache_dir` (CLIP_CACHE_DIR). With
    `auto`, an OpenVINO engine that fails to load (a model it cannot convert) falls back to torch.
    """
    backend = choose_backend(backend_setting, device_setting, precision_setting)
    if backend == "openvino":
        if cache_dir is None:
            raise ModelLoadError("The OpenVINO engine needs a cache folder (CLIP_CACHE_DIR) for its "
                                 "converted model")
        try:
            return _load_openvino(spec, precision_setting, cache_dir)
        except Exception as error:
            if backend_setting != "auto":
                if isinstance(error, ModelLoadError):
                    raise
                raise ModelLoadError(f"CLIP_BACKEND=openvino could not run CLIP_MODEL={spec.name} "
                                     f"({type(error).__name__}: {error}); use CLIP_BACKEND=torch") from error
            log.warning("OpenVINO could not run CLIP_MODEL=%s (%s: %s); using torch", spec.name,
                        type(error).__name__, error)
            precision_setting = "auto" if precision_setting == "int8" else precision_setting
    from clip_service.engines.torch_engine import load_torch_engine

    return load_torch_engine(spec, device_setting, precision_setting)


def _load_openvino(spec: ModelSpec, precision_setting: str, cache_dir: Path) -> Engine:
    import torch  # the thread count gunicorn's post_fork set for this worker (TORCH_THREADS)

    from clip_service.engines.openvino_engine import load_openvino_engine

    return load_openvino_engine(spec, precision_setting, cache_dir, torch.get_num_threads())


def engine_for_settings(settings: Settings) -> Engine:
    """The engine the settings ask for: CLIP_MODEL, CLIP_BACKEND, CLIP_DEVICE, CLIP_PRECISION."""
    return load_engine(settings.model_spec, settings.device, settings.precision, settings.backend,
                       settings.cache_dir)


def default_batch_size(engine: Engine) -> int:
    """Images per forward pass when BATCH_MAX_SIZE or --batch-size does not say: more on a GPU."""
    return 64 if engine.device_kind == "cuda" else 8
