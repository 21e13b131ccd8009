"""startup.py: the checks before serving stop start-up with one line naming what is wrong, never a
traceback, and hand over the validated settings when all is well."""

from __future__ import annotations

import dataclasses
import os

import pytest

from clip_service import startup
from clip_service.settings import Settings, settings_from_mapping
from clip_service.startup import preflight_or_exit


@pytest.fixture
def environment(clean_env, tiny_model_dir, labels_dir):
    clean_env.setenv("CLIP_MODEL", f"local-dir:{tiny_model_dir}")
    clean_env.setenv("CLIP_LABELS_DIR", str(labels_dir))
    return clean_env


def test_valid_settings_labels_and_weights_pass(environment, tiny_model_dir, capsys):
    settings = preflight_or_exit()
    assert settings.clip_model == f"local-dir:{tiny_model_dir}"
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("variable, value, start", [
    ("MAX_QUEUE", "many", "clip-service: MAX_QUEUE=many is not an integer"),
    ("CLIP_MODEL", "local-dir:/nowhere", "clip-service: CLIP_MODEL=local-dir:/nowhere names no folder"),
    ("CLIP_PROMPT_TEMPLATE", "no placeholder", "clip-service: CLIP_PROMPT_TEMPLATE"),
])
def test_a_bad_setting_stops_start_up_with_one_line(environment, capsys, variable, value, start):
    environment.setenv(variable, value)
    with pytest.raises(SystemExit) as stopped:
        preflight_or_exit()
    assert stopped.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(start), line


def test_a_labels_folder_without_labels_stops_start_up(environment, tmp_path, capsys):
    environment.setenv("CLIP_LABELS_DIR", str(tmp_path))
    with pytest.raises(SystemExit):
        preflight_or_exit()
    assert "No labels loaded" in capsys.readouterr().err


def test_a_model_folder_without_weights_stops_start_up(environment, tiny_model_dir, tmp_path, capsys):
    (tmp_path / "open_clip_config.json").write_text((tiny_model_dir / "open_clip_config.json").read_text())
    environment.setenv("CLIP_MODEL", f"local-dir:{tmp_path}")
    with pytest.raises(SystemExit):
        preflight_or_exit()
    assert "holds no weights" in capsys.readouterr().err

@pytest.mark.parametrize("mode, warned", [(0o700, False), (0o755, False), (0o775, True), (0o777, True)])
def test_a_cache_others_can_write_is_warned_of(environment, tmp_path, capsys, mode, warned):
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(mode)
    environment.setenv("CLIP_CACHE_DIR", str(cache))
    preflight_or_exit()
    err = capsys.readouterr().err
    assert ("can be written by others" in err) == warned, err
    if warned:
        assert err.startswith(f"clip-service: warning: CLIP_CACHE_DIR={cache} can be written by others (mode "
                              f"{mode:o}, owner uid") and "chmod go-w" in err


# How many workers, decided in the master without touching CUDA


@pytest.mark.parametrize("on_gpu, cores, expected", [
    (False, 2, 1), (False, 64, 1),  # a CPU: one model, every core for its inference threads
    (True, 1, 1), (True, 2, 2), (True, 16, 4),  # a GPU: one per core, at most 4
])
def test_default_workers(on_gpu, cores, expected):
    assert startup.default_workers(on_gpu, cores) == expected


def test_workers_setting_wins():
    settings = settings_from_mapping({"WORKERS": "3", "CLIP_DEVICE": "cuda"})
    assert startup.worker_count(settings) == 3


@pytest.mark.parametrize("values, on_gpu", [
    ({"CLIP_DEVICE": "cuda:1"}, True),
    ({"CLIP_DEVICE": "cpu"}, False),
    ({"CLIP_BACKEND": "openvino"}, False),
    ({"CLIP_PRECISION": "int8"}, False),
])
def test_gpu_decided_from_the_settings(values, on_gpu):
    assert startup.serves_on_gpu(settings_from_mapping(values)) is on_gpu


def test_auto_device_asks_torch_without_initialising_cuda(monkeypatch):
    import torch

    counted = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: counted.append(1) or 2)
    settings = dataclasses.replace(Settings(), device="auto", backend="auto")
    assert startup.serves_on_gpu(settings) and counted
    assert startup.worker_count(settings) == startup.default_workers(True, os.cpu_count() or 1)
    assert not torch.cuda.is_initialized()
