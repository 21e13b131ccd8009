"""The OpenVINO engine against torch fp32 on real photos, its on-disk export, and choosing an engine.

Covers engines/openvino_engine.py, engines/openvino_export.py, engines/openvino_import.py (no usage
reports), engines/text_prefix.py and engines/tokens.py (texts sharing a template's first tokens).

The tiny random model recognises nothing, so "the same answers" means features within a cosine of
torch fp32's and the same top labels in the same order among the test labels.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clip_service.engines import openvino_quantize, registry
from clip_service.engines.base import ModelLoadError
from clip_service.engines.registry import choose_backend, load_engine
from clip_service.engines.spec import parse_model_spec
from clip_service.engines.text_prefix import shared_prefix_length
from clip_service.engines.tokens import end_of_text_lengths
from clip_service.tasks.classify import label_probabilities
from tests.support.images import encode
from tests.support.models import TINY_CONFIG, write_tiny_clip
from tests.support.trained_clip import COLOURS, assert_mostly_named, unseen_pictures

ROOT = Path(__file__).resolve().parent.parent
LABELS = ["cat", "dog", "astronaut", "coffee", "rocket", "woman", "man", "car", "tree", "pizza", "beach",
          "mountain", "flower", "bird", "computer", "uniform", "cup", "kitten", "space", "red"]
TEMPLATES = ["a photo of a {}.", "itap of a {}.", "a {} in a video game.", "art of the {}."]
# Least cosine to torch fp32 for each precision (issue 10: 0.999 for the engine, 0.99 for int8 images)
LEAST_COSINE = {"fp32": 0.999, "bf16": 0.999, "int8": 0.99}


def real_photos() -> dict[str, Image.Image]:
    """Photos that ship in scikit-image's and matplotlib's wheels."""
    import matplotlib.cbook
    import skimage.data

    photos = {name: Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
              for name in ("astronaut", "coffee", "chelsea", "rocket")}
    with matplotlib.cbook.get_sample_data("grace_hopper.jpg") as handle:
        photos["grace_hopper"] = Image.open(handle).convert("RGB")
    return photos


PHOTOS = real_photos()


@pytest.fixture(scope="module", autouse=True)
def int8_weights_only():
    """int8 here is the weights-only export whatever the CPU; test_openvino_quantize covers the
    quantised activations a CPU with VNNI or AMX gets."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(openvino_quantize, "cpu_runs_int8_activations", lambda core: False)
        yield


@pytest.fixture(scope="module")
def spec(tiny_model_dir):
    return parse_model_spec(f"local-dir:{tiny_model_dir}")


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("openvino-cache")


@pytest.fixture(scope="module")
def torch_fp32(spec):
    return load_engine(spec, "cpu", "fp32", "torch")


@pytest.fixture(scope="module", params=["fp32", "bf16", "int8"])
def openvino_engine(request, spec, export_dir):
    return load_engine(spec, "cpu", request.param, "openvino", export_dir)


def cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def photo_pixels(engine) -> torch.Tensor:
    return torch.stack([engine.prepare(photo) for photo in PHOTOS.values()])  # (5, 3, H, W) uint8


def test_engine_describes_itself(openvino_engine, torch_fp32):
    assert openvino_engine.backend == "openvino"
    assert (openvino_engine.device_name, openvino_engine.device_kind) == ("cpu", "cpu")
    assert openvino_engine.input_size == torch_fp32.input_size == (64, 64)
    assert openvino_engine.logit_scale == pytest.approx(torch_fp32.logit_scale)
    assert openvino_engine.logit_bias is None
    assert openvino_engine.identity != torch_fp32.identity, "label caches of two engines never mix"


def test_prepared_pixels_are_the_torch_engines(openvino_engine, torch_fp32):
    for photo in PHOTOS.values():
        assert torch.equal(openvino_engine.prepare(photo), torch_fp32.prepare(photo))


def test_image_features_match_torch_fp32_on_real_photos(openvino_engine, torch_fp32):
    pixels = photo_pixels(torch_fp32)
    features = openvino_engine.encode_images(pixels)
    assert features.dtype == torch.float32 and features.shape == (len(PHOTOS), 32)
    assert torch.allclose(features.norm(dim=-1), torch.ones(len(PHOTOS)), atol=1e-4)
    least = cosines(features, torch_fp32.encode_images(pixels)).min().item()
    assert least >= LEAST_COSINE[openvino_engine.precision], f"{openvino_engine.precision}: {least:.5f}"


def test_text_features_match_torch_fp32(openvino_engine, torch_fp32):
    texts = [template.format(label) for template in TEMPLATES for label in LABELS]
    features = openvino_engine.encode_texts(texts, batch_size=16)  # several lengths, several batches
    least = cosines(features, torch_fp32.encode_texts(texts)).min().item()
    assert least >= LEAST_COSINE[openvino_engine.precision], f"{openvino_engine.precision}: {least:.5f}"


def test_same_top_labels_as_torch_fp32(openvino_engine, torch_fp32):
    texts = [f"a photo of a {label}." for label in LABELS]
    pixels = photo_pixels(torch_fp32)
    expected = label_probabilities(torch_fp32.encode_images(pixels), torch_fp32.encode_texts(texts),
                                   torch_fp32.logit_scale)
    got = label_probabilities(openvino_engine.encode_images(pixels), openvino_engine.encode_texts(texts),
                              openvino_engine.logit_scale)
    # random weights spread the probabilities thinly: the top label, and every probability close
    # (the colour-trained model below holds the ranking to account)
    for name, want, have in zip(PHOTOS, expected, got, strict=True):
        assert int(have.argmax()) == int(want.argmax()), name
    assert (expected - got).abs().max() < 0.01


def test_texts_sharing_a_template_equal_texts_encoded_alone(openvino_engine, torch_fp32):
    """Together, a template's first tokens are encoded once (text_prefix); alone, each text whole."""
    texts = ["a photo of a cat.", "a photo of a golden retriever puppy playing in the snow.",
             "a photo of a x.", "a photo of a red double-decker bus in london."]
    tokens = openvino_engine.tokenizer(texts)
    assert shared_prefix_length(tokens, end_of_text_lengths(tokens)) == 5, "<start> a photo of a"
    together = openvino_engine.encode_texts(texts, batch_size=2)
    alone = torch.cat([openvino_engine.encode_texts([text]) for text in texts])
    assert openvino_engine.cuts_context
    assert cosines(together, alone).min() > (0.9999 if openvino_engine.precision == "fp32" else 0.999)
    assert cosines(together, torch_fp32.encode_texts(texts)).min() >= LEAST_COSINE[openvino_engine.precision]


def test_int8_stores_int8_weights(spec, export_dir):
    load_engine(spec, "cpu", "int8", "openvino", export_dir)
    load_engine(spec, "cpu", "fp32", "openvino", export_dir)
    sizes = {}
    for manifest in export_dir.glob("openvino/*/manifest.json"):
        weights = '"weights": "int8"' in manifest.read_text()
        sizes[weights] = (manifest.parent / "text.bin").stat().st_size
    assert sizes[True] < 0.3 * sizes[False], "int8 weights are a quarter of f32's, plus scales"


# -------------------------------------------------------------------------------------- the export


def converted(caplog) -> int:
    return sum("Converting CLIP_MODEL=" in record.getMessage() for record in caplog.records)


def test_export_is_converted_once_then_read(tiny_model_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    spec = parse_model_spec(f"local-dir:{tiny_model_dir}")
    first = load_engine(spec, "cpu", "fp32", "openvino", tmp_path)
    second = load_engine(spec, "cpu", "fp32", "openvino", tmp_path)
    assert converted(caplog) == 1
    pixels = photo_pixels(first)
    assert torch.equal(first.encode_images(pixels), second.encode_images(pixels))
    assert not list((tmp_path / "openvino").glob(".converting-*")), "no work folder left behind"


DAMAGES = ("flip bytes", "truncate", "no manifest", "garbled manifest")


def damage_export(folder: Path, damage: str) -> None:
    weights = folder / "image.bin"
    data = bytearray(weights.read_bytes())
    if damage == "flip bytes":  # same size, other numbers: only the checksum can tell
        data[100:108] = bytes(8)
        weights.write_bytes(bytes(data))
    elif damage == "truncate":
        weights.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "no manifest":
        (folder / "manifest.json").unlink()
    else:
        (folder / "manifest.json").write_text("{not json")


def test_corrupt_export_is_rebuilt(tiny_model_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    spec = parse_model_spec(f"local-dir:{tiny_model_dir}")
    reference = load_engine(spec, "cpu", "fp32", "openvino", tmp_path)
    pixels = photo_pixels(reference)
    expected = reference.encode_images(pixels)  # before any damage: OpenVINO maps the weights file
    folder = next((tmp_path / "openvino").glob("*/manifest.json")).parent
    for number, damage in enumerate(DAMAGES, start=2):
        damage_export(folder, damage)
        rebuilt = load_engine(spec, "cpu", "fp32", "openvino", tmp_path)
        assert converted(caplog) == number, damage
        assert torch.equal(rebuilt.encode_images(pixels), expected), damage
    assert caplog.text.count("converting again") == len(DAMAGES)


def test_new_openvino_version_converts_again(tiny_model_dir, tmp_path, caplog, monkeypatch):
    from clip_service.engines import openvino_export

    caplog.set_level(logging.INFO)
    spec = parse_model_spec(f"local-dir:{tiny_model_dir}")
    load_engine(spec, "cpu", "fp32", "openvino", tmp_path)
    real = openvino_export.ov.get_version()
    monkeypatch.setattr(openvino_export.ov, "get_version", lambda: real + "-next")
    load_engine(spec, "cpu", "fp32", "openvino", tmp_path)
    assert converted(caplog) == 2
    assert len(list((tmp_path / "openvino").glob("*/manifest.json"))) == 2


def test_changed_model_converts_again(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    spec = parse_model_spec(f"local-dir:{write_tiny_clip(tmp_path / 'model', seed=1)}")
    before = load_engine(spec, "cpu", "fp32", "openvino", tmp_path / "cache")
    pixels = photo_pixels(before)
    old_features = before.encode_images(pixels)
    write_tiny_clip(tmp_path / "model", seed=2)  # same folder, other weights
    after = load_engine(spec, "cpu", "fp32", "openvino", tmp_path / "cache")
    assert converted(caplog) == 2
    assert not torch.allclose(after.encode_images(pixels), old_features, atol=1e-3)
    assert after.identity != before.identity, "so the label features are encoded again too"


def test_openvino_sends_no_usage_reports(tiny_model_dir, tmp_path):
    """`import openvino` and ov.convert_model report to Intel and write ~/intel unless silenced."""
    code = ("import sys; from pathlib import Path; from clip_service.engines.registry import load_engine; "
            "from clip_service.engines.spec import parse_model_spec; "
            f"load_engine(parse_model_spec('local-dir:{tiny_model_dir}'), 'cpu', 'fp32', 'openvino', "
            f"Path('{tmp_path / 'cache'}'))")
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home)}
    env.pop("CI", None)  # openvino_telemetry is silent in CI on its own; the service must be everywhere
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert list((tmp_path / "cache" / "openvino").glob("*/manifest.json")), "it did convert"
    assert list(home.iterdir()) == [], "nothing written in the home folder (telemetry's client id)"


# ----------------------------------------------------------------------------- choosing an engine


def test_auto_picks_openvino_on_the_cpu_and_torch_elsewhere(monkeypatch):
    assert choose_backend("auto", "cpu", "auto") == "openvino"
    assert choose_backend("auto", "cuda:0", "auto") == "torch"
    assert choose_backend("torch", "cpu", "auto") == "torch"
    assert choose_backend("auto", "auto", "int8") == "openvino"
    monkeypatch.setattr(registry, "openvino_installed", lambda: False)
    assert choose_backend("auto", "cpu", "auto") == "torch", "without openvino, torch"
    assert choose_backend("auto", "auto", "fp32") == "torch"


def test_auto_falls_back_to_torch_when_openvino_fails(spec, tmp_path, monkeypatch, caplog):
    def broken(*args):
        raise RuntimeError("Exception from src/frontends/pytorch: unsupported operation")

    monkeypatch.setattr(registry, "_load_openvino", broken)
    engine = load_engine(spec, "cpu", "auto", "auto", tmp_path)
    assert engine.backend == "torch"
    assert "OpenVINO could not run" in caplog.text and "using torch" in caplog.text
    with pytest.raises(ModelLoadError, match="CLIP_BACKEND=openvino could not run .* use CLIP_BACKEND=torch"):
        load_engine(spec, "cpu", "auto", "openvino", tmp_path)


def test_the_service_answers_with_openvino(make_app, settings, tmp_path):
    app = make_app(dataclasses.replace(settings, backend="openvino", precision="auto"))
    engine = app.extensions["clip_service"].classifier.engine
    assert engine.backend == "openvino"
    upload = io.BytesIO(encode(np.asarray(PHOTOS["coffee"]), "JPEG"))
    response = app.test_client().post("/analyze", data={"file": (upload, "coffee.jpg")})
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["status"] == "success" and body["predictions"]


@pytest.fixture(scope="module")
def trained_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("trained-cache")


@pytest.mark.parametrize("precision", ["fp32", "bf16", "int8"])
def test_the_colour_trained_model_gives_torch_fp32s_top_labels(trained_model_dir, trained_cache, precision):
    """On a model that knows something (tests/trained_clip.py), every engine names the same colours."""
    from clip_service.tasks.classify import Classifier
    from clip_service.vocabulary.features import build_vocabulary
    from clip_service.vocabulary.labels import LabelSet, load_templates

    spec = parse_model_spec(f"local-dir:{trained_model_dir}")
    templates = load_templates(ROOT / "prompts" / "ensemble.txt")
    no_emoji = type("NoEmoji", (), {"emoji_for": lambda self, label: None})()
    labels = LabelSet(tuple(COLOURS))
    classifiers = [Classifier(engine, build_vocabulary(engine, labels, templates, trained_cache), no_emoji)
                   for engine in (load_engine(spec, "cpu", "fp32", "torch"),
                                  load_engine(spec, "cpu", precision, "openvino", trained_cache))]
    named = []
    for colour, _, picture in unseen_pictures(COLOURS, 6, size=96, first_seed=72_000):
        # the labels with a real share (5 % or more), in the same order; near-zero ones may swap
        reference = classifiers[0].classify(picture, 0.05, 3)
        candidate = classifiers[1].classify(picture, 0.0, 3)[:len(reference)]
        assert [p.label for p in candidate] == [p.label for p in reference], (colour, precision)
        assert [p.confidence for p in candidate] == pytest.approx([p.confidence for p in reference],
                                                                  abs=0.02)
        named.append((colour, candidate[0].label))
    assert_mostly_named(named)


def test_shared_prefix_through_several_layers(tmp_path):
    """A 3-layer text tower: the shared positions' states feed every layer, not just the first."""
    config = {**TINY_CONFIG, "text_cfg": {**TINY_CONFIG["text_cfg"], "layers": 3}}
    spec = parse_model_spec(f"local-dir:{write_tiny_clip(tmp_path / 'deep', seed=3, model_cfg=config)}")
    reference = load_engine(spec, "cpu", "fp32", "torch")
    engine = load_engine(spec, "cpu", "fp32", "openvino", tmp_path / "cache")
    for template in TEMPLATES:
        texts = [template.format(label) for label in LABELS]
        got, expected = engine.encode_texts(texts, batch_size=8), reference.encode_texts(texts)
        assert cosines(got, expected).min() > 0.9999, template


class CpuReading:
    """An ov.Core's answer to OPTIMIZATION_CAPABILITIES, as a CPU with or without bf16 gives it."""

    def __init__(self, capabilities: list[str]):
        self.capabilities = capabilities

    def get_property(self, device: str, name: str):
        assert (device, name) == ("CPU", "OPTIMIZATION_CAPABILITIES")
        return self.capabilities


@pytest.mark.parametrize("capabilities, expected", [
    (["FP32", "INT8", "BIN", "EXPORT_IMPORT"], "fp32"),  # AVX2 or AVX-512 without BF16
    (["FP32", "BF16", "FP16", "INT8", "BIN", "EXPORT_IMPORT"], "bf16"),  # AMX or AVX512-BF16
])
def test_auto_precision_follows_the_cpus_bf16(capabilities, expected):
    """CLIP_PRECISION=auto on OpenVINO: bf16 only where the CPU runs it natively (only torch's choice
    was tested); a setting given is kept whatever the CPU."""
    from clip_service.engines.openvino_engine import resolve_precision

    assert resolve_precision("auto", CpuReading(capabilities)) == expected
    assert resolve_precision("fp32", CpuReading(capabilities)) == "fp32"
    assert resolve_precision("int8", CpuReading(capabilities)) == "int8"


def _unquantised_matmuls(xml: Path) -> list[str]:
    """The MatMuls of an exported tower whose weights are not int8 or uint8 constants (NNCF's int8
    weights are a u8/i8 Constant behind Convert, Subtract and Multiply)."""
    from clip_service.engines.openvino_import import ov

    def constant_types(output, depth=0) -> set[str]:
        node = output.get_node()
        if node.get_type_name() == "Constant":
            return {node.get_element_type().get_type_name()}
        if node.get_type_name() in ("Parameter",) or depth > 6:
            return set()
        return set().union(*(constant_types(value.get_source_output(), depth + 1) for value in node.inputs()))

    model = ov.Core().read_model(str(xml))
    faults = []
    for node in model.get_ops():
        if node.get_type_name() != "MatMul":
            continue
        weight = node.input(1).get_source_output()
        if weight.get_node().get_type_name() == "Parameter":
            continue
        kinds = constant_types(weight)
        if kinds and not kinds & {"u8", "i8", "u4", "i4"}:
            faults.append(f"{node.get_friendly_name()}: {sorted(kinds)}")
    return faults


def test_int8_quantises_the_weights_of_both_towers(spec, export_dir):
    """Weighing text.bin alone shows the token table shrink, not the layers: every weight MatMul of
    each tower must read int8 weights."""
    load_engine(spec, "cpu", "int8", "openvino", export_dir)
    load_engine(spec, "cpu", "fp32", "openvino", export_dir)
    folders = {'"weights": "int8"' in manifest.read_text(): manifest.parent
               for manifest in export_dir.glob("openvino/*/manifest.json")}
    for tower in ("image", "text"):
        assert _unquantised_matmuls(folders[True] / f"{tower}.xml") == [], tower
        assert _unquantised_matmuls(folders[False] / f"{tower}.xml"), f"the check finds f32 {tower} weights"
