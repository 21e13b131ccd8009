"""The Engine protocol as the torch engine fills it (engines/from_spec.py: what every engine answers
alike), and what CLIP_MODEL errors say."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from clip_service.engines.base import EngineOutOfMemory
from clip_service.engines.from_spec import EngineFromSpec
from clip_service.engines.preprocess import model_input_pixels
from clip_service.engines.registry import default_batch_size
from clip_service.engines.spec import ModelSpec, ModelSpecError, parse_model_spec


def test_engine_describes_itself_without_torch_types(tiny_engine, tiny_model_dir):
    assert tiny_engine.backend == "torch"
    assert (tiny_engine.device_name, tiny_engine.device_kind) == ("cpu", "cpu")
    assert tiny_engine.weights_source == "OpenCLIP" and tiny_engine.name == f"local-dir:{tiny_model_dir}"
    assert tiny_engine.input_size == (64, 64)
    assert default_batch_size(tiny_engine) == 8


def test_every_engine_takes_its_names_and_input_step_from_its_spec(tiny_engine):
    """EngineFromSpec, as the torch engine (and the OpenVINO one) inherit it: names from the ModelSpec,
    the input as (3, H, W) uint8 of exactly the pixels of the one-step crop."""
    class Minimal(EngineFromSpec):
        spec, geometry = ModelSpec("ViT-B/32", "ViT-B-32-quickgelu", "openai"), tiny_engine.geometry
        _pil_steps = staticmethod(lambda image: image.resize((64, 64)))

    engine = Minimal()
    assert (engine.name, engine.weights_source) == ("ViT-B/32", "OpenAI")
    photo = Image.effect_mandelbrot((160, 90), (-2, -1, 1, 1), 50).convert("RGB")
    pixels = engine.prepare(photo)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 64, 64)
    expected = torch.from_numpy(model_input_pixels(photo, engine.geometry, engine._pil_steps))
    assert torch.equal(pixels.permute(1, 2, 0), expected)
    assert torch.equal(tiny_engine.prepare(photo), pixels), "the torch engine's input step is this one"


def test_out_of_memory_becomes_the_backend_neutral_error(tiny_engine, monkeypatch):
    def exhausted(pixels):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(tiny_engine.model, "encode_image", exhausted)
    pixels = tiny_engine.prepare(Image.new("RGB", (64, 64))).unsqueeze(0)
    with pytest.raises(EngineOutOfMemory, match="cpu ran out of memory on a batch of 1") as caught:
        tiny_engine.encode_images(pixels)
    assert isinstance(caught.value.__cause__, torch.OutOfMemoryError)


def test_other_engine_errors_pass_through(tiny_engine, monkeypatch):
    def broken(pixels):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(tiny_engine.model, "encode_image", broken)
    with pytest.raises(RuntimeError, match="device-side assert"):
        tiny_engine.encode_images(tiny_engine.prepare(Image.new("RGB", (64, 64))).unsqueeze(0))


@pytest.mark.parametrize("raw, start", [
    ("ViT-B/33", "CLIP_MODEL=ViT-B/33 is not a known model; known: ViT-B/32"),
    ("hf-hub:a b", "CLIP_MODEL=hf-hub:a b is not a Hugging Face repository"),
    ("local-dir:/nonexistent", "CLIP_MODEL=local-dir:/nonexistent names no folder"),
])
def test_spec_errors_are_whole_sentences_naming_the_value(raw, start):
    with pytest.raises(ModelSpecError) as caught:
        parse_model_spec(raw)
    assert str(caught.value).startswith(start)
