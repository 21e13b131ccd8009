"""What runs in the gunicorn master before the workers fork: how many workers, without touching CUDA."""

from __future__ import annotations

import dataclasses
import os

import pytest

from clip_service import startup
from clip_service.settings import Settings, settings_from_mapping


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
