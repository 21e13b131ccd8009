"""Preprocessing inside the compiled image tower: decoded uint8 pixels in, OpenVINO resizes and crops.

OpenVINO's PrePostProcessor puts the steps in front of the exported tower (which takes uint8 (N, 3, H,
W) pixels and normalises them with the model's mean and std inside its graph): (N, H, W, 3) uint8 of any
height and width -> float -> the model's resize with OpenVINO's Pillow-compatible filter (the
Interpolate mode that ResizeAlgorithm.RESIZE_BICUBIC_PILLOW inserts) -> centre crop -> rounded to uint8
as Pillow rounds -> (N, 3, H, W). The height and width are dynamic, so one compiled model takes every
image size; the images of one call must share a size, and `PreprocessingTower.encode` batches them by
size. The answers equal the Pillow path's (tests/test_openvino_preprocess.py: a mean difference of
0.1-0.2 grey levels in the model input on real photos).

Measured here (bench/preprocess.py), OpenVINO's Pillow-compatible bicubic costs several times Pillow's
own resize on this AVX2 CPU, so the server keeps the Pillow path (the request threads resize), and this
is the engine's second way in, for whoever measures a CPU where it wins.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from clip_service.engines.openvino_import import ov
from clip_service.engines.preprocess import InputGeometry

# Pillow's resampling filter -> OpenVINO's Pillow-compatible Interpolate mode and PrePostProcessor step
PILLOW_MODES = {Image.Resampling.BICUBIC: "bicubic_pillow", Image.Resampling.BILINEAR: "bilinear_pillow"}
PILLOW_CUBIC_COEFFICIENT = -0.5  # Pillow's bicubic kernel (OpenVINO's own cubic default is -0.75)


def supports(geometry: InputGeometry) -> bool:
    """Whether the graph can do this model's resize: shortest side and a square centre crop, or squash."""
    height, width = geometry.input_size
    return geometry.resample in PILLOW_MODES and (
        geometry.resize_mode == "squash" or (geometry.resize_mode == "shortest" and height == width))


def with_preprocessing(tower: ov.Model, geometry: InputGeometry) -> ov.Model:
    """The exported image tower (uint8 (N, 3, H, W) in) with the resize and crop in front of it:
    uint8 (N, H', W', 3) of any H', W' in. Call only when `supports(geometry)`."""
    from openvino.preprocess import PrePostProcessor, ResizeAlgorithm

    processor = PrePostProcessor(tower)
    image = processor.input()
    image.tensor().set_element_type(ov.Type.u8).set_layout(ov.Layout("NHWC")).set_shape([-1, -1, -1, 3])
    image.model().set_layout(ov.Layout("NCHW"))
    steps = image.preprocess()
    steps.convert_element_type(ov.Type.f32)
    mode = PILLOW_MODES[geometry.resample]
    if geometry.resize_mode == "squash":
        algorithm = (ResizeAlgorithm.RESIZE_BICUBIC_PILLOW if mode == "bicubic_pillow"
                     else ResizeAlgorithm.RESIZE_BILINEAR_PILLOW)
        steps.resize(algorithm)  # to the tower's own (H, W)
    else:
        steps.custom(lambda pixels: _shortest_side_then_crop(pixels, geometry.input_size[0], mode))
    steps.custom(_as_pillow_rounds)
    steps.convert_element_type(ov.Type.u8)
    steps.convert_layout(ov.Layout("NCHW"))
    return processor.build()


def _shortest_side_then_crop(pixels: ov.Output, side: int, mode: str) -> ov.Output:
    """(N, H, W, 3) float -> (N, side, side, 3): torchvision's Resize(side) then CenterCrop(side), as
    open_clip's eval transform does them, with sizes computed in the graph from each batch's shape."""
    from openvino import opset11, opset13

    def const(values, dtype=np.int64):
        return opset13.constant(np.array(values, dtype=dtype))

    height_width = opset13.gather(opset13.shape_of(pixels, "i64"), const([1, 2]), const(0))  # (2,)
    short = opset13.reduce_min(height_width, const(0), True)  # (1,)
    # Resize(side): the short side to `side`, the long one to int(side * long / short)
    sizes = opset13.divide(opset13.multiply(height_width, const(side)), short)  # positive: floor
    resized = opset11.interpolate(pixels, sizes, mode, "sizes", axes=const([1, 2]),
                                  cube_coeff=PILLOW_CUBIC_COEFFICIENT)
    # CenterCrop(side): the offset is round((size - side) / 2), halves to even as Python rounds
    halves = opset13.divide(opset13.convert(opset13.subtract(sizes, const(side)), ov.Type.f32),
                            const(2.0, np.float32))
    start = opset13.convert(opset13.round(halves, "half_to_even"), ov.Type.i64)
    return opset13.slice(resized, start, opset13.add(start, const(side)), const([1, 1]),
                         const([1, 2])).output(0)


def _as_pillow_rounds(pixels: ov.Output) -> ov.Output:
    """Resized float pixels -> whole grey levels in 0..255, as Pillow's 8-bit resize leaves them."""
    from openvino import opset13

    rounded = opset13.round(pixels, "half_to_even")
    return opset13.clamp(rounded, 0.0, 255.0).output(0)


def pixels_only(geometry: InputGeometry) -> ov.Model:
    """The preprocessing alone: uint8 (N, H', W', 3) -> the uint8 (N, 3, H, W) it hands the tower (an
    identity stands in for the tower), for tests and bench/preprocess.py."""
    from openvino import opset13

    height, width = geometry.input_size
    parameter = opset13.parameter([-1, 3, height, width], ov.Type.u8, name="pixels")
    identity = ov.Model([opset13.convert(parameter, ov.Type.u8)], [parameter], "pixels_only")
    return with_preprocessing(identity, geometry)


def size_groups(images: Sequence[np.ndarray]) -> dict[tuple[int, ...], list[int]]:
    """Indexes of the images, grouped by shape in order of first appearance: one batch per size."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(image.shape, []).append(index)
    return groups


class PreprocessingTower:
    """The image tower compiled with its preprocessing: decoded (H, W, 3) uint8 images -> unit features."""

    def __init__(self, compiled: ov.CompiledModel):
        self._request = compiled.create_infer_request()

    @classmethod
    def compile(cls, core: ov.Core, tower_path, geometry: InputGeometry, config: dict) -> PreprocessingTower:
        return cls(core.compile_model(with_preprocessing(core.read_model(tower_path), geometry), "CPU",
                                      config))

    def encode(self, images: Sequence[np.ndarray], per_image: bool = False) -> torch.Tensor:
        """(H, W, 3) uint8 RGB images of any sizes -> (N, D) unit float32 features, in order.

        Images of one size share a forward pass (N, H, W, 3); with `per_image`, each has its own.
        Not thread-safe: one caller at a time, as the engine's batcher is.
        """
        features: list[torch.Tensor | None] = [None] * len(images)
        groups = ([[index] for index in range(len(images))] if per_image
                  else list(size_groups(images).values()))
        for indexes in groups:
            batch = np.stack([images[index] for index in indexes])  # (n, H, W, 3)
            result = self._request.infer([batch], share_inputs=True)[0]
            for row, index in enumerate(indexes):
                features[index] = torch.from_numpy(result[row].copy())
        return torch.stack(features)
