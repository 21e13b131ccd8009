"""engines/preprocess.py: the input geometry read from open_clip's config, and the one-step resize of the
box the centre crop keeps, which must give the pixels the plain resize-then-crop would."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from clip_service.engines.preprocess import InputGeometry, model_input_pixels, resize_to_crop, uint8_pixels

SHORTEST = InputGeometry((64, 64), "shortest", Image.Resampling.BICUBIC)


def plain_resize_and_crop(image: Image.Image, side: int) -> Image.Image:
    """torchvision's Resize(side) then CenterCrop(side), as open_clip's eval transform does them."""
    width, height = image.size
    size = (side, int(side * height / width)) if width < height else (int(side * width / height), side)
    resized = image.resize(size, Image.Resampling.BICUBIC)
    left, top = int(round((size[0] - side) / 2.0)), int(round((size[1] - side) / 2.0))
    return resized.crop((left, top, left + side, top + side))


def test_geometry_from_open_clip_configs():
    assert InputGeometry.from_open_clip({"size": 224}) == InputGeometry(
        (224, 224), "shortest", Image.Resampling.BICUBIC)
    assert InputGeometry.from_open_clip({"size": [256, 192], "interpolation": "bilinear",
                                         "resize_mode": "squash"}) == InputGeometry(
        (256, 192), "squash", Image.Resampling.BILINEAR)
    assert InputGeometry.from_open_clip({"interpolation": "random"}).resample == Image.Resampling.BICUBIC


@pytest.mark.parametrize("size", [(20, 600), (900, 30), (1, 5000)])
def test_a_very_long_image_is_resized_in_one_step_to_the_same_pixels(size):
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, max(size))[:, None] if size[1] > size[0] else np.linspace(0, 255, max(size))
    pixels = np.broadcast_to(ramp, (size[1], size[0])).astype(np.float64)
    pixels = np.clip(pixels[..., None] + rng.normal(0, 8, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    quick = resize_to_crop(image, SHORTEST)
    assert quick is not None and quick.size == (64, 64)
    difference = np.abs(np.asarray(quick, np.int16) - np.asarray(plain_resize_and_crop(image, 64), np.int16))
    assert difference.mean() < 2.0, f"mean difference {difference.mean():.2f} grey levels"


@pytest.mark.parametrize("size, side", [
    ((640, 480), 224), ((1920, 1080), 224), ((480, 640), 224), ((451, 300), 64), ((999, 1000), 224),
    ((224, 224), 224), ((100, 70), 224),  # square already; smaller than the input (enlarged)
])
def test_an_ordinary_photo_is_resized_in_one_step_to_the_same_pixels(size, side):
    """Every photo takes the one-step path: it may differ from the plain transform by rounding only."""
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    quick = resize_to_crop(image, InputGeometry((side, side), "shortest", Image.Resampling.BICUBIC))
    assert quick is not None and quick.size == (side, side)
    plain = plain_resize_and_crop(image, side)
    difference = np.abs(np.asarray(quick, np.int16) - np.asarray(plain, np.int16))
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01, (
        f"{(difference > 0).sum()} pixels differ, by up to {difference.max()} grey levels")


@pytest.mark.parametrize("size, geometry", [
    ((20, 600), InputGeometry((64, 64), "squash", Image.Resampling.BICUBIC)),
    ((20, 600), InputGeometry((64, 48), "shortest", Image.Resampling.BICUBIC)),
])
def test_geometries_without_a_square_centre_crop_are_left_to_the_plain_transform(size, geometry):
    assert resize_to_crop(Image.new("RGB", size), geometry) is None


def test_model_input_pixels_take_the_one_step_crop_or_the_models_own_steps():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    calls = []

    def own_steps(picture):
        calls.append(picture.size)
        return picture.resize((64, 48))

    cropped = model_input_pixels(image, SHORTEST, own_steps)
    assert calls == [] and np.array_equal(cropped, np.asarray(resize_to_crop(image, SHORTEST)))
    squash = InputGeometry((48, 64), "squash", Image.Resampling.BICUBIC)
    squashed = model_input_pixels(image, squash, own_steps)
    assert calls == [(400, 300)] and squashed.shape == (48, 64, 3) and squashed.dtype == np.uint8


def test_uint8_pixels_are_height_width_channels_and_writable():
    pixels = uint8_pixels(Image.new("RGB", (5, 3), (1, 2, 3)))
    assert pixels.shape == (3, 5, 3) and pixels.dtype == np.uint8 and pixels.flags.writeable
    assert pixels[0, 0].tolist() == [1, 2, 3]
