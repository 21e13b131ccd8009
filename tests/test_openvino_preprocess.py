"""Preprocessing inside the compiled OpenVINO tower (engines/openvino_preprocess.py) against the Pillow path.

The model input it makes must be the Pillow path's within one grey level on average (issue 19), on real
photos as they arrive: PNGs, and JPEGs decoded as the server decodes them (a reduced DCT scale); and the
colour-trained model must give the same answers through it.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from clip_service.engines.openvino_import import ov
from clip_service.engines.openvino_preprocess import pixels_only, size_groups, supports
from clip_service.engines.preprocess import InputGeometry, model_input_pixels
from clip_service.engines.registry import load_engine
from clip_service.engines.spec import parse_model_spec
from clip_service.inputs.images import ImageLimits, decode_image
from tests.support.images import encode
from tests.support.trained_clip import COLOURS, assert_mostly_named, unseen_pictures

BICUBIC_224 = InputGeometry((224, 224), "shortest", Image.Resampling.BICUBIC)  # ViT-B/32's
LIMITS = ImageLimits(max_bytes=1 << 26, max_pixels=1 << 26)


@functools.cache
def skimage_photos() -> dict[str, Image.Image]:
    import skimage.data

    return {name: Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
            for name in ("astronaut", "coffee", "chelsea", "rocket")}


def as_server_decodes(photo: Image.Image, size: tuple[int, int] | None, geometry: InputGeometry,
                      ) -> Image.Image:
    """The photo as a request brings it: the PNG as it is, or a JPEG of `size` decoded at the reduced DCT
    scale the server picks for this model input."""
    if size is None:
        return photo
    data = encode(photo.resize(size, Image.Resampling.LANCZOS), "JPEG", quality=90)
    return decode_image(data, LIMITS, geometry.input_size)


@pytest.fixture(scope="module")
def preprocessing():
    """geometry -> a compiled request of the preprocessing alone (uint8 (1, H', W', 3) -> (1, 3, H, W))."""
    core, compiled = ov.Core(), {}

    def request(geometry: InputGeometry):
        if geometry not in compiled:
            compiled[geometry] = core.compile_model(pixels_only(geometry), "CPU",
                                                    {"INFERENCE_NUM_THREADS": 1}).create_infer_request()
        return compiled[geometry]
    return request


@pytest.mark.parametrize("size", [None, (640, 480), (1920, 1080)], ids=["png", "640x480", "1920x1080"])
def test_model_input_is_the_pillow_paths(preprocessing, size):
    """Mean absolute difference of the model input <= 1 grey level on every photo (0.1-0.2 measured:
    the graph resizes the whole short side and then crops, Pillow only the box it keeps)."""
    request = preprocessing(BICUBIC_224)
    for name, photo in skimage_photos().items():
        image = as_server_decodes(photo, size, BICUBIC_224)
        pillow = model_input_pixels(image, BICUBIC_224, lambda _: None).astype(np.float32)  # (H, W, 3)
        graph = request.infer([np.asarray(image)[None]])[0][0].transpose(1, 2, 0)  # (3, H, W) -> (H, W, 3)
        assert graph.shape == pillow.shape == (224, 224, 3), name
        difference = np.abs(graph.astype(np.float32) - pillow)
        assert difference.mean() <= 1.0, f"{name} {image.size}: {difference.mean():.2f} grey levels"
        assert np.percentile(difference, 99) <= 4, f"{name}: a few pixels may differ by rounding, not more"


def test_squash_and_bilinear_use_the_pillow_filter(preprocessing):
    """A squashing model resizes with PrePostProcessor's own RESIZE_*_PILLOW step; bilinear models too."""
    photo = skimage_photos()["coffee"]  # 600 x 400
    for geometry in (InputGeometry((64, 96), "squash", Image.Resampling.BICUBIC),
                     InputGeometry((64, 64), "shortest", Image.Resampling.BILINEAR)):
        assert supports(geometry)
        height, width = geometry.input_size
        pillow = np.asarray(photo.resize((width, height), geometry.resample)
                            if geometry.resize_mode == "squash"
                            else model_input_pixels(photo, geometry, lambda _: None), np.float32)
        graph = preprocessing(geometry).infer([np.asarray(photo)[None]])[0][0].transpose(1, 2, 0)
        assert np.abs(graph - pillow).mean() <= 1.0, geometry


def test_geometries_the_graph_cannot_do_keep_pillow():
    assert not supports(InputGeometry((224, 224), "longest", Image.Resampling.BICUBIC))
    assert not supports(InputGeometry((224, 320), "shortest", Image.Resampling.BICUBIC))
    assert not supports(InputGeometry((224, 224), "shortest", Image.Resampling.LANCZOS))


def test_size_groups_batch_each_size_once_in_order():
    images = [np.zeros(shape, np.uint8) for shape in [(4, 6, 3), (6, 4, 3), (4, 6, 3), (5, 5, 3)]]
    assert list(size_groups(images).values()) == [[0, 2], [1], [3]]


@pytest.fixture(scope="module")
def trained_openvino(trained_model_dir, tmp_path_factory):
    spec = parse_model_spec(f"local-dir:{trained_model_dir}")
    return load_engine(spec, "cpu", "fp32", "openvino", tmp_path_factory.mktemp("openvino-cache"))


def test_colour_model_answers_the_same_through_the_graph(trained_openvino):
    """The colour-trained model names every unseen picture the same through either path, in one call
    that mixes sizes (batched by size) and one image at a time, and names them right."""
    engine = trained_openvino
    tower = engine.preprocessing_tower()
    assert tower is not None
    texts = engine.encode_texts([f"a photo of a {colour}." for colour in COLOURS])  # (8, D)
    # pictures of three sizes, each as a JPEG decoded as the server decodes it
    pictures = [(colour, decode_image(encode(picture, "JPEG", quality=92), LIMITS, engine.input_size))
                for index, size in enumerate((96, 160, 300))
                for colour, _, picture in unseen_pictures(COLOURS, 3, size, 20_000 + 1_000 * index)]
    images = [image for _, image in pictures]
    pillow = engine.encode_images(torch.stack([engine.prepare(image) for image in images]))
    arrays = [np.asarray(image) for image in images]
    graph, one_by_one = tower.encode(arrays), tower.encode(arrays, per_image=True)
    assert torch.equal(graph.argmax(dim=-1), one_by_one.argmax(dim=-1))
    assert torch.nn.functional.cosine_similarity(graph, pillow, dim=-1).min() >= 0.999
    named_by_pillow = [list(COLOURS)[int(i)] for i in (pillow @ texts.T).argmax(dim=-1)]
    named_by_graph = [list(COLOURS)[int(i)] for i in (graph @ texts.T).argmax(dim=-1)]
    assert named_by_graph == named_by_pillow
    assert_mostly_named(zip([colour for colour, _ in pictures], named_by_graph, strict=True))
