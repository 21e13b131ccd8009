"""What every engine built from an open_clip model answers the same way, whatever runs the model."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from clip_service.engines.preprocess import InputGeometry, model_input_pixels
from clip_service.engines.spec import ModelSpec


class EngineFromSpec:
    """An engine's names (from its ModelSpec) and its input step (the one-step crop, else the model's
    own Pillow steps); a subclass sets `spec`, `geometry` and `_pil_steps`."""

    spec: ModelSpec
    geometry: InputGeometry
    _pil_steps: Callable[[Image.Image], Image.Image]

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def weights_source(self) -> str:
        return self.spec.weights_source

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """An RGB image -> the model's input, resized and cropped: (3, H, W) uint8."""
        pixels = model_input_pixels(image, self.geometry, self._pil_steps)
        return torch.from_numpy(pixels).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
