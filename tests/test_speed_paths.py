"""The fast paths give the same answers as the plain ones (issue: speed). Nothing here is timed."""

import functools
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from clip_service.engines.registry import load_engine
from clip_service.engines.spec import parse_model_spec
from clip_service.inputs.images import ImageLimits, decode_image
from clip_service.runtime.batching import MicroBatcher
from clip_service.tasks.classify import label_probabilities
from tests.support.images import encode
from tests.support.models import TINY_CONFIG, write_tiny_clip

LIMITS = ImageLimits(64 * 1024 * 1024, 100_000_000)


@pytest.fixture(scope="module")
def deep_text_engine(tmp_path_factory):
    """A tiny model with a 3-layer text tower, so the causal cut is tested through several layers."""
    config = {**TINY_CONFIG, "text_cfg": {**TINY_CONFIG["text_cfg"], "layers": 3}}
    folder = write_tiny_clip(tmp_path_factory.mktemp("deep-text"), seed=3, model_cfg=config)
    return load_engine(parse_model_spec(f"local-dir:{folder}"), "cpu")


def full_context_features(engine, texts):
    with torch.inference_mode():
        features = engine.model.encode_text(engine.tokenizer(texts)).float()
    return torch.nn.functional.normalize(features, dim=-1)


def test_short_context_text_features_equal_the_full_77_token_path(deep_text_engine):
    texts = ["a photo of a cat.", "a photo of a golden retriever puppy playing in the snow.", "x",
             "art of the {}.", "itap of a red double-decker bus in london.", "a photo of a " + "very " * 30]
    fast = deep_text_engine.encode_texts(texts, batch_size=4)
    assert fast.shape == (len(texts), 32)
    assert torch.allclose(fast, full_context_features(deep_text_engine, texts), atol=1e-5)


def test_long_text_is_cut_with_a_warning_not_an_error(deep_text_engine, caplog):
    long_text = "a photo of " + "a very big and " * 60 + "cat."
    features = deep_text_engine.encode_texts([long_text, "a cat"])
    assert torch.isfinite(features).all()
    assert "context" in caplog.text


def test_uint8_preparation_matches_open_clips_float_transform(deep_text_engine):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 451, 3), dtype=np.uint8))
    prepared = deep_text_engine.prepare(image)
    assert prepared.dtype == torch.uint8 and prepared.shape == (3, 64, 64)
    reference = deep_text_engine.preprocess(image)
    fast = deep_text_engine.encode_images(prepared.unsqueeze(0))
    plain = deep_text_engine.encode_images(reference.unsqueeze(0))
    assert torch.allclose(fast, plain, atol=1e-5)


@pytest.fixture(scope="module")
def default_size_engine(tmp_path_factory):
    """A tiny model with the default model's (ViT-B/32's) 224-pixel input."""
    config = {**TINY_CONFIG, "vision_cfg": {**TINY_CONFIG["vision_cfg"], "image_size": 224, "patch_size": 32}}
    folder = write_tiny_clip(tmp_path_factory.mktemp("input-224"), seed=4, model_cfg=config)
    return load_engine(parse_model_spec(f"local-dir:{folder}"), "cpu")


@functools.cache
def photo(name: str) -> np.ndarray:
    """Real photos: skimage's and matplotlib's samples (motorcycle is the one with the finest detail)."""
    import matplotlib.cbook
    import skimage.data

    if name == "grace_hopper":
        with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
            return np.asarray(Image.open(handle).convert("RGB"))
    if name == "motorcycle":
        return skimage.data.stereo_motorcycle()[0]
    return getattr(skimage.data, name)()


PHOTOS = ["astronaut", "coffee", "chelsea", "rocket", "grace_hopper", "motorcycle"]


@functools.cache
def photo_jpeg(name: str, size: tuple[int, int]) -> bytes:
    return encode(Image.fromarray(photo(name)).resize(size, Image.BICUBIC), "JPEG", quality=90)


# Photo size -> the size decoded for each model input: the smallest DCT scale (1, 1/2, 1/4, 1/8) that
# keeps both sides at least twice the input (measured before that rule, at 224: a 640x480 photo drafted
# to 320x240 moved the model input by 2.2 grey levels on average on `motorcycle`).
DRAFTS = [
    (64, (4032, 3024), (504, 378)),
    (224, (640, 480), (640, 480)),
    (224, (1280, 960), (640, 480)),
    (224, (4032, 3024), (1008, 756)),
]


@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("input_side, size, drafted", DRAFTS,
                         ids=[f"{side}px-{w}x{h}" for side, (w, h), _ in DRAFTS])
def test_draft_decoding_keeps_the_model_input_close(deep_text_engine, default_size_engine, name, input_side,
                                                    size, drafted):
    engine = {64: deep_text_engine, 224: default_size_engine}[input_side]
    assert engine.input_size == (input_side, input_side)
    data = photo_jpeg(name, size)
    full = decode_image(data, LIMITS)
    draft = decode_image(data, LIMITS, engine.input_size)
    assert full.size == size and draft.size == drafted
    difference = (engine.prepare(full).float() - engine.prepare(draft).float()).abs()
    # Measured worst over these photos: 0.16 (64 px, 12 MP), 0.46 (224 px, 1280x960).
    assert difference.mean().item() < 1.0, f"{name}: mean absolute difference {difference.mean():.2f}"


def test_draft_keeps_exif_orientation(deep_text_engine):
    image = Image.new("RGB", (1600, 800), (200, 20, 20))
    image.paste((20, 20, 200), (0, 0, 800, 800))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encode(image, "JPEG", exif=exif)
    full = decode_image(data, LIMITS)
    draft = decode_image(data, LIMITS, deep_text_engine.input_size)
    assert full.size == (800, 1600) and draft.size[0] < draft.size[1]


def test_batched_answers_equal_unbatched(deep_text_engine):
    rng = np.random.default_rng(1)
    inputs = [deep_text_engine.prepare(Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)))
              for _ in range(12)]
    alone = [deep_text_engine.encode_images(pixels.unsqueeze(0))[0] for pixels in inputs]
    batcher = MicroBatcher(deep_text_engine.encode_images, max_batch=8, max_wait_s=0.05,
                           arriving=lambda: 12)
    results = [None] * len(inputs)

    def submit(index):
        results[index] = batcher.submit(inputs[index], deadline=time.monotonic() + 30)

    threads = [threading.Thread(target=submit, args=(index,)) for index in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert max(batcher.batch_sizes) > 1, "concurrent requests shared a forward pass"
    labels = deep_text_engine.encode_texts([f"a photo of a {word}." for word in ("cat", "dog", "car")])
    for one, batched in zip(alone, results, strict=True):
        assert torch.allclose(one, batched, atol=1e-4)
        confidences = [label_probabilities(f[None], labels, deep_text_engine.logit_scale)[0]
                       for f in (one, batched)]
        assert (confidences[0] - confidences[1]).abs().max() < 5e-4  # same to the third decimal


def test_lone_request_does_not_wait_for_company(deep_text_engine):
    calls = []

    def encode(pixels):
        calls.append(len(pixels))
        return deep_text_engine.encode_images(pixels)

    batcher = MicroBatcher(encode, max_batch=8, max_wait_s=10.0, arriving=lambda: 1)
    pixels = deep_text_engine.prepare(Image.new("RGB", (64, 64)))
    assert batcher.submit(pixels, deadline=time.monotonic() + 5).shape == (32,)
    assert calls == [1]


@pytest.mark.parametrize("size", [(1, 100_000), (100_000, 1), (30, 2000), (2000, 30)])
def test_extreme_aspect_ratios_are_trimmed_to_the_same_input(deep_text_engine, size):
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    prepared = deep_text_engine.prepare(image)
    assert prepared.shape == (3, 64, 64)
    if max(size) <= 2000:  # small enough for the untrimmed reference path
        reference = np.asarray(deep_text_engine._pil_steps(image), dtype=np.int16)
        difference = np.abs(reference - prepared.permute(1, 2, 0).numpy().astype(np.int16))
        assert difference.mean() < 1.0
