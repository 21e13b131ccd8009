"""Which engine runs a CLIP_MODEL on the configured device: today every model runs on open_clip and torch.

A runtime's module is imported only when its engine is built, so choosing needs none of them.
"""

from __future__ import annotations

from clip_service.engines.base import Engine
from clip_service.engines.spec import ModelSpec

BACKENDS = ("torch",)


def load_engine(spec: ModelSpec, device_setting: str = "auto", precision_setting: str = "auto") -> Engine:
    """The loaded engine for `spec` (CLIP_DEVICE and CLIP_PRECISION as given); raises ModelLoadError."""
    from clip_service.engines.torch_engine import load_torch_engine

    return load_torch_engine(spec, device_setting, precision_setting)


def default_batch_size(engine: Engine) -> int:
    """Images per forward pass when BATCH_MAX_SIZE or --batch-size does not say: more on a GPU."""
    return 64 if engine.device_kind == "cuda" else 8
