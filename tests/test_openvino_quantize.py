"""Real int8 (engines/openvino_quantize.py): the image tower's activations quantised by NNCF where the CPU
has VNNI or AMX, on calibration pictures made from the shipped photos, kept in the conversion cache.

The CPU test machines may lack VNNI, so each test says which CPU it plays (cpu_runs_int8_activations
patched); OpenVINO runs a quantised graph on any x86 CPU, only not faster without those instructions.
Speed and the full-size figures are bench/int8.py's.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clip_service.engines import openvino_engine, openvino_export, openvino_quantize
from clip_service.engines.base import ModelLoadError
from clip_service.engines.openvino_import import ov
from clip_service.engines.registry import load_engine
from clip_service.engines.spec import model_identity, parse_model_spec
from tests.support.trained_clip import COLOURS, assert_mostly_named, unseen_pictures


@pytest.fixture(scope="module")
def trained_spec(trained_model_dir):
    return parse_model_spec(f"local-dir:{trained_model_dir}")


@pytest.fixture(scope="module")
def int8_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("int8-cache")


def playing(monkeypatch, vnni: bool) -> None:
    monkeypatch.setattr(openvino_quantize, "cpu_runs_int8_activations", lambda core: vnni)


def op_count(xml: Path, kind: str) -> int:
    return sum(node.get_type_name() == kind for node in ov.Core().read_model(xml).get_ordered_ops())


def export_of(cache: Path, weights: str) -> Path:
    folders = [path.parent for path in cache.glob("openvino/*/manifest.json")
               if json.loads(path.read_text())["weights"] == weights]
    assert len(folders) == 1, f"{len(folders)} exports with {weights} weights"
    return folders[0]


def top_colours(engine, pictures) -> list[str]:
    names = list(COLOURS)
    texts = engine.encode_texts([f"a photo of a {name}." for name in names])  # (8, D)
    pixels = torch.stack([engine.prepare(picture) for _, _, picture in pictures])
    return [names[i] for i in (engine.encode_images(pixels) @ texts.T).argmax(dim=-1).tolist()]


# ------------------------------------------------------------------------------------------ the CPU


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 avx512_vnni\n\n"
                       "processor\t: 1\nflags\t\t: fpu\n")
    assert openvino_quantize.cpu_flags(cpuinfo) == {"fpu", "avx2", "avx512_vnni"}
    assert openvino_quantize.cpu_flags(tmp_path / "absent") == frozenset()


class FakeCore:
    def __init__(self, capabilities):
        self.capabilities = capabilities

    def get_property(self, device, name):
        assert (device, name) == ("CPU", "OPTIMIZATION_CAPABILITIES")
        return self.capabilities


@pytest.mark.parametrize("flags, capabilities, expected", [
    ({"avx2", "fma"}, ["FP32", "INT8"], False),  # OpenVINO lists INT8 on AVX2 alone: not enough
    ({"avx2", "avx512_vnni"}, ["FP32", "INT8", "BF16"], True),
    ({"avx2", "avx_vnni"}, ["FP32", "INT8"], True),
    ({"amx_int8", "amx_tile"}, ["FP32", "INT8", "BF16"], True),
    ({"avx512_vnni"}, ["FP32"], False),  # an OpenVINO without int8 on this CPU
])
def test_activations_are_quantised_only_with_vnni_or_amx(monkeypatch, flags, capabilities, expected):
    monkeypatch.setattr(openvino_quantize, "cpu_flags", lambda: frozenset(flags))
    assert openvino_quantize.cpu_runs_int8_activations(FakeCore(capabilities)) is expected


# -------------------------------------------------------------------------------- the calibration set


def test_calibration_inputs_are_varied_model_inputs_made_the_same_each_time():
    inputs = openvino_quantize.calibration_inputs(40, 48, count=16)
    assert len(inputs) == 16
    assert all(array.shape == (1, 3, 40, 48) and array.dtype == np.uint8 for array in inputs)
    again = openvino_quantize.calibration_inputs(40, 48, count=16)
    assert all(np.array_equal(a, b) for a, b in zip(inputs, again, strict=True)), "a fixed seed"
    stacked = np.concatenate(inputs).astype(np.int16)  # (16, 3, 40, 48)
    assert len({array.tobytes() for array in inputs}) == 16, "no two alike"
    coloured = [np.abs(picture - picture[:1]).max() > 8 for picture in stacked]
    assert 4 <= sum(coloured) < 16, "grey photos tinted some of the time, colour photos kept"


def test_calibration_photos_ship_with_the_service():
    photos = openvino_quantize.calibration_photo_paths()
    assert len(photos) >= 8
    readme = (openvino_quantize.CALIBRATION_DIR / "README.md").read_text()
    assert all(f"| {path.name} |" in readme for path in photos), "each photo's source and licence"


def test_missing_calibration_photos_are_named(monkeypatch, tmp_path):
    monkeypatch.setattr(openvino_quantize, "CALIBRATION_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        openvino_quantize.calibration_inputs(32, 32, count=2)


def test_export_key_changes_with_the_recipe_and_the_photos(monkeypatch, tmp_path, tiny_model_dir):
    identity = model_identity(parse_model_spec(f"local-dir:{tiny_model_dir}"))
    key = openvino_export.export_key(identity, openvino_quantize.INT8_ACTIVATIONS)
    assert key != openvino_export.export_key(identity, "int8")
    monkeypatch.setattr(openvino_quantize, "RECIPE", openvino_quantize.RECIPE + " more")
    assert openvino_export.export_key(identity, openvino_quantize.INT8_ACTIVATIONS) != key
    monkeypatch.undo()
    photos = tmp_path / "calibration"
    shutil.copytree(openvino_quantize.CALIBRATION_DIR, photos)
    monkeypatch.setattr(openvino_quantize, "CALIBRATION_DIR", photos)
    assert openvino_export.export_key(identity, openvino_quantize.INT8_ACTIVATIONS) == key
    first = openvino_quantize.calibration_photo_paths()[0]
    first.write_bytes(first.read_bytes() + b"\x00")
    assert openvino_export.export_key(identity, openvino_quantize.INT8_ACTIVATIONS) != key


# ---------------------------------------------------------------------------------- the engine


def test_with_vnni_int8_quantises_image_activations_once(monkeypatch, trained_spec, int8_cache, caplog):
    playing(monkeypatch, vnni=True)
    caplog.set_level(logging.INFO, logger="clip_service")
    engine = load_engine(trained_spec, "cpu", "int8", "openvino", int8_cache)
    assert engine.int8_activations and engine.precision == "int8"
    folder = export_of(int8_cache, openvino_quantize.INT8_ACTIVATIONS)
    assert op_count(folder / "image.xml", "FakeQuantize") >= 8, "activations and weights of every layer"
    assert op_count(folder / "text.xml", "FakeQuantize") == 0, "the text tower: int8 weights only"
    assert any("Quantising the image tower" in record.getMessage() for record in caplog.records)

    caplog.clear()
    again = load_engine(trained_spec, "cpu", "int8", "openvino", int8_cache)
    assert again.int8_activations
    assert not any("Converting CLIP_MODEL=" in record.getMessage() for record in caplog.records), \
        "the quantised export is read from the cache, not made again"


def test_quantised_tower_names_colours_as_fp32_does(monkeypatch, trained_spec, int8_cache):
    playing(monkeypatch, vnni=True)
    int8 = load_engine(trained_spec, "cpu", "int8", "openvino", int8_cache)
    fp32 = load_engine(trained_spec, "cpu", "fp32", "torch")
    pictures = unseen_pictures(COLOURS, 6)  # 48 pictures it never saw
    named = top_colours(int8, pictures)
    assert_mostly_named(((colour, name) for (colour, _, _), name in zip(pictures, named, strict=True)))
    same = sum(a == b for a, b in zip(named, top_colours(fp32, pictures), strict=True))
    assert same >= len(pictures) - 1, f"{same} of {len(pictures)} answers as torch fp32's"


def test_without_vnni_int8_keeps_weights_only(monkeypatch, trained_spec, int8_cache):
    playing(monkeypatch, vnni=False)
    engine = load_engine(trained_spec, "cpu", "int8", "openvino", int8_cache)
    assert not engine.int8_activations
    folder = export_of(int8_cache, "int8")
    assert op_count(folder / "image.xml", "FakeQuantize") == 0
    assert op_count(folder / "image.xml", "Convert") > 0, "int8 weights, restored by Convert x scale"


def test_without_nncf_int8_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "nncf", None)  # import nncf raises ImportError
    with pytest.raises(ModelLoadError, match="CLIP_PRECISION=int8 .*NNCF.*requirements.txt"):
        openvino_quantize.quantize_image_tower(None, 32, 32)


def test_the_tower_bench_prints_int8_over_bf16():
    from bench.tower import TowerFigures, int8_ratio

    rows = [TowerFigures("torch", "fp32", 50, 40, 25, 1), TowerFigures("openvino", "bf16", 20, 10, 100, 1),
            TowerFigures("openvino", "int8", 10, 5, 200, 0.999, int8_activations=True)]
    assert int8_ratio(rows) == "openvino int8 (weights + activations) / bf16 images/s at batch 8: 2.00 x"
    assert int8_ratio(rows[:2]) is None


def test_what_int8_leaves_in_float_runs_in_bf16_where_the_cpu_has_it(monkeypatch, trained_spec, int8_cache):
    """The image tower's norms and softmax in bf16, as the bf16 engine's are; the text tower as before."""
    playing(monkeypatch, vnni=True)
    monkeypatch.setattr(openvino_engine, "cpu_has_bf16", lambda core: True)
    hints = {}
    real = ov.Core.compile_model

    def recording(core, model, device, config):
        hints[Path(model).stem] = config["INFERENCE_PRECISION_HINT"]
        return real(core, model, device, config)

    monkeypatch.setattr(ov.Core, "compile_model", recording)
    load_engine(trained_spec, "cpu", "int8", "openvino", int8_cache)
    assert hints == {"image": "bf16", "text": "f32"}
    playing(monkeypatch, vnni=False)
    load_engine(trained_spec, "cpu", "int8", "openvino", int8_cache)
    assert hints == {"image": "f32", "text": "f32"}, "weights-only int8 as before"
