"""The Engine protocol as the torch engine fills it, and what CLIP_MODEL errors say."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from clip_service.engines.base import EngineOutOfMemory
from clip_service.engines.registry import default_batch_size
from clip_service.engines.spec import ModelSpecError, parse_model_spec


def test_engine_describes_itself_without_torch_types(tiny_engine, tiny_model_dir):
    assert tiny_engine.backend == "torch"
    assert (tiny_engine.device_name, tiny_engine.device_kind) == ("cpu", "cpu")
    assert tiny_engine.weights_source == "OpenCLIP" and tiny_engine.name == f"local-dir:{tiny_model_dir}"
    assert tiny_engine.input_size == (64, 64)
    assert default_batch_size(tiny_engine) == 8


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
