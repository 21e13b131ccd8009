import dataclasses
import os
import shutil

import open_clip
import pytest
import torch
from PIL import Image

from clip_service.engines.base import ModelLoadError
from clip_service.engines.registry import load_engine
from clip_service.engines.spec import OPENAI_MODELS, model_identity, parse_model_spec
from clip_service.engines.torch_engine import resolve_device
from clip_service.engines.weights import fetch_weights
from tests.support.images import image_bytes
from tests.support.models import SIGLIP_PREPROCESS, TINY_SIGLIP_CONFIG, write_tiny_clip
from tests.support.responses import assert_success, upload


@pytest.mark.parametrize("name", list(OPENAI_MODELS))
def test_openai_names_map_to_openai_weights_with_quickgelu(name):
    spec = parse_model_spec(name)
    assert spec.pretrained == "openai"
    assert spec.weights_source == "OpenAI"
    assert spec.open_clip_name.endswith("-quickgelu")


@pytest.mark.parametrize("name, arch, tag", [
    ("ViT-B-32:laion2b_s34b_b79k", "ViT-B-32", "laion2b_s34b_b79k"),
    ("ViT-B-16-SigLIP:webli", "ViT-B-16-SigLIP", "webli"),
])
def test_arch_pretrained_pairs(name, arch, tag):
    spec = parse_model_spec(name)
    assert (spec.open_clip_name, spec.pretrained, spec.weights_source) == (arch, tag, "OpenCLIP")


def test_hf_hub_form():
    spec = parse_model_spec("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    assert spec.open_clip_name == "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    assert spec.pretrained is None and spec.weights_source == "OpenCLIP"


def test_local_dir_form(tiny_model_dir):
    spec = parse_model_spec(f"local-dir:{tiny_model_dir}")
    assert spec.local_dir == tiny_model_dir.resolve()


def test_local_dir_without_weights_is_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "no-weights"
    folder.mkdir()
    shutil.copy(tiny_model_dir / "open_clip_config.json", folder)
    with pytest.raises(ValueError, match="holds no weights.*never served"):
        parse_model_spec(f"local-dir:{folder}")


def test_local_dir_weights_the_service_cannot_read_are_named(tiny_model_dir, tmp_path, monkeypatch):
    """open_clip reports a weights file it may not read as missing; the operator needs to hear why."""
    folder = tmp_path / "unreadable"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "open_clip_model.safetensors").chmod(0)
    if os.geteuid() == 0:  # root reads anything: answer as the unprivileged service user would
        monkeypatch.setattr(os, "access", lambda path, mode: bool(os.stat(path).st_mode & 0o444))
    with pytest.raises(ValueError, match=r"open_clip_model.safetensors cannot be read by the user the "
                                         r"service runs as \(uid \d+\); give that user read access"):
        parse_model_spec(f"local-dir:{folder}")


def test_an_unreadable_leftover_beside_the_weights_open_clip_loads_is_no_matter(tiny_model_dir, tmp_path,
                                                                                monkeypatch):
    folder = tmp_path / "leftover"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "pytorch_model.bin").write_bytes(b"old")
    (folder / "pytorch_model.bin").chmod(0)
    if os.geteuid() == 0:
        monkeypatch.setattr(os, "access", lambda path, mode: bool(os.stat(path).st_mode & 0o444))
    assert parse_model_spec(f"local-dir:{folder}").local_dir == folder.resolve()


def test_local_dir_without_config_is_refused(tmp_path):
    with pytest.raises(ValueError, match="has no open_clip_config.json"):
        parse_model_spec(f"local-dir:{tmp_path}")


def test_missing_weights_offline_say_how_to_provide_them(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(ModelLoadError) as caught:
        fetch_weights(parse_model_spec("ViT-B/32"))
    message = str(caught.value)
    assert "CLIP_MODEL=ViT-B/32" in message
    for hint in ("HF_HUB_OFFLINE", "local-dir:", "cache"):
        assert hint in message


@pytest.fixture
def hub_calls(monkeypatch) -> list[tuple[str, tuple]]:
    """open_clip's download functions, recording their calls instead of reaching the hub."""
    calls = []
    for module, name in [(open_clip, "get_pretrained_cfg"), (open_clip, "download_pretrained"),
                         (open_clip.factory, "_get_hf_config"),
                         (open_clip.pretrained, "download_pretrained_from_hf")]:
        monkeypatch.setattr(module, name, lambda *args, name=name, **kwargs: calls.append((name, args)))
    return calls


def test_local_dir_needs_no_fetch(tiny_model_dir, hub_calls):
    fetch_weights(parse_model_spec(f"local-dir:{tiny_model_dir}"))
    assert hub_calls == [], "a local-dir: model must not touch the hub"


@pytest.mark.parametrize("model, downloads", [
    ("ViT-B/32", ["get_pretrained_cfg", "download_pretrained"]),
    ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", ["_get_hf_config", "download_pretrained_from_hf"]),
])
def test_hub_models_are_fetched_before_the_workers_start(hub_calls, model, downloads):
    fetch_weights(parse_model_spec(model))
    assert [name for name, _ in hub_calls] == downloads


def test_device_choice():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.backends.mps.is_available():
        assert resolve_device("auto").type == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message when CUDA is absent")
def test_cuda_requested_without_cuda_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="CLIP_DEVICE=cuda but CUDA is not available"):
        resolve_device("cuda")


def test_engine_gives_unit_features(tiny_engine):
    engine = tiny_engine
    pixels = torch.stack([engine.preprocess(Image.new("RGB", (90, 50), colour))
                          for colour in ("red", "blue")])
    assert pixels.shape == (2, 3, 64, 64)
    images = engine.encode_images(pixels)
    texts = engine.encode_texts(["a photo of a cat.", "a photo of a dog.", "x"], batch_size=2)
    assert images.shape == (2, 32) and texts.shape == (3, 32)
    assert torch.allclose(images.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(texts.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert engine.logit_scale == pytest.approx(1 / 0.07, rel=1e-4)


def test_identity_changes_with_weights(tmp_path):
    first = parse_model_spec(f"local-dir:{write_tiny_clip(tmp_path / 'a', seed=1)}")
    before = model_identity(first)
    write_tiny_clip(tmp_path / "a", seed=2)
    assert model_identity(first) != before
    assert model_identity(parse_model_spec("ViT-B/32")) != model_identity(parse_model_spec("ViT-B/16"))


def test_precision_choice():
    from clip_service.engines.torch_engine import resolve_precision

    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    assert resolve_precision("bf16", torch.device("cpu")) == "bf16"
    assert resolve_precision("auto", torch.device("cuda", 0)) == "fp16"
    assert resolve_precision("auto", torch.device("cpu")) in ("fp32", "bf16")
    with pytest.raises(ModelLoadError, match="CLIP_PRECISION=fp16 needs CUDA"):
        resolve_precision("fp16", torch.device("cpu"))


def test_bf16_image_tower_gives_the_same_answers(tiny_model_dir):
    from clip_service.tasks.classify import label_probabilities

    spec = parse_model_spec(f"local-dir:{tiny_model_dir}")
    full, half = load_engine(spec, "cpu", "fp32"), load_engine(spec, "cpu", "bf16")
    assert half.dtype == torch.bfloat16 and full.dtype == torch.float32
    texts = [f"a photo of a {word}." for word in ("cat", "dog", "car", "tree", "person")]
    labels = full.encode_texts(texts)
    assert torch.equal(labels, half.encode_texts(texts)), "the text tower keeps full precision"
    assert full.identity == half.identity, "so the label cache is shared"
    images = torch.stack([full.prepare(Image.new("RGB", (80, 60), colour))
                          for colour in ("red", "green", "navy", "white")])
    a = label_probabilities(full.encode_images(images), labels, full.logit_scale)
    b = label_probabilities(half.encode_images(images), labels, half.logit_scale)
    assert (a - b).abs().max() < 0.01


def test_siglip_shaped_model_works_end_to_end(make_app, settings, tmp_path):
    """Beyond OpenAI's CLIP: custom text tower, timm image tower, its own preprocessing, sigmoid."""
    folder = write_tiny_clip(tmp_path / "siglip", model_cfg=TINY_SIGLIP_CONFIG,
                             preprocess_cfg=SIGLIP_PREPROCESS)
    app = make_app(dataclasses.replace(settings, clip_model=f"local-dir:{folder}"))
    engine = app.extensions["clip_service"].classifier.engine
    assert type(engine.model).__name__ == "CustomTextCLIP"
    assert engine.resize_mode == "squash" and engine.logit_bias == pytest.approx(-10.0)
    texts = ["a photo of a cat.", "a photo of a small dog on a sofa."]
    with torch.inference_mode():
        full = torch.nn.functional.normalize(
            engine.model.encode_text(engine.tokenizer(texts)).float(), dim=-1)
    assert torch.allclose(engine.encode_texts(texts), full, atol=1e-5)
    client = app.test_client()
    body = assert_success(upload(client, image_bytes("JPEG", (300, 100))))
    assert body["predictions"], "threshold 0: every label is answered"
