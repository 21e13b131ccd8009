"""Image preparation that any engine can share: the model's input geometry and the Pillow-side steps.

What is here works on Pillow images and numpy arrays only; turning them into a runtime's tensors and
normalising them is the engine's part.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class InputGeometry:
    """How a model wants its images: size, resize rule and resampling filter (open_clip's config)."""

    input_size: tuple[int, int]  # (H, W)
    resize_mode: str  # "shortest" (resize the short side, centre-crop), "squash" or "longest"
    resample: Image.Resampling

    @classmethod
    def from_open_clip(cls, config: dict) -> InputGeometry:
        """From open_clip's preprocess config (get_model_preprocess_cfg)."""
        size = config.get("size", 224)
        # open_clip's eval transform: bilinear when asked for, bicubic otherwise ("random" included)
        bilinear = config.get("interpolation") == "bilinear"
        return cls((size, size) if isinstance(size, int) else tuple(size),
                   config.get("resize_mode", "shortest"),
                   Image.Resampling.BILINEAR if bilinear else Image.Resampling.BICUBIC)


def resize_to_crop(image: Image.Image, geometry: InputGeometry) -> Image.Image | None:
    """Resize and centre-crop in one step: only the box that the centre crop keeps is resized.

    The plain transform resizes the short side first and then throws away what the crop cuts: a
    quarter of the work for a 4:3 photo, 44 % for 16:9 (960x540 -> 224: 3.3 ms -> 1.9 ms), and
    gigabytes for a 1 x 100,000 image, whose plain resize is 224 x 22,400,000. Resizing the kept box at
    the same scale gives the same pixels, up to rounding (at most one grey level, on a few pixels).
    None for geometries without a square centre crop: they take the plain transform.
    """
    side, other_side = geometry.input_size
    if geometry.resize_mode != "shortest" or side != other_side:
        return None
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = int(side * long / short)  # torchvision's Resize(side) output, long axis
    top = int(round((new_long - side) / 2.0))  # torchvision's CenterCrop offset
    scale = long / new_long
    start, end = top * scale, (top + side) * scale
    box = (start, 0, end, height) if width > height else (0, start, width, end)
    return image.resize((side, side), geometry.resample, box=box)


def model_input_pixels(image: Image.Image, geometry: InputGeometry,
                       pil_steps: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    """An RGB image -> the model's input as (H, W, 3) uint8: the one-step crop where the geometry has a
    square centre crop, else the model's own Pillow steps (open_clip's transform without its tensor part)."""
    return uint8_pixels(resize_to_crop(image, geometry) or pil_steps(image))


def uint8_pixels(image: Image.Image) -> np.ndarray:
    """A resized RGB image -> its (H, W, 3) uint8 pixels, writable (a runtime may take them as is)."""
    return np.array(image, dtype=np.uint8)
