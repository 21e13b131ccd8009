"""metrics.py: what is published for the loaded model, stage timing, and where /metrics reads from."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from clip_service import metrics


def _value(name: str, **labels) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_a_new_model_or_label_set_replaces_the_old_series():
    info = metrics.ModelInfo()
    first = {"model": "local-dir:m1", "framework": "OpenCLIP", "device": "cpu", "labels_version": "v1"}
    second = {**first, "labels_version": "v2"}
    info.publish("local-dir:m1", "OpenCLIP", "cpu", "v1", 10)
    assert _value("clip_model_info", **first) == 1 and _value("clip_labels") == 10
    info.publish("local-dir:m1", "OpenCLIP", "cpu", "v2", 11)
    assert _value("clip_model_info", **first) == 0, "the replaced label set no longer counts as loaded"
    assert _value("clip_model_info", **second) == 1 and _value("clip_labels") == 11
    info.publish("local-dir:m1", "OpenCLIP", "cpu", "v2", 11)
    assert _value("clip_model_info", **second) == 1


def test_timed_observes_the_block_even_when_it_fails():
    before = _value("clip_stage_seconds_count", stage="decode") or 0.0
    with metrics.timed("decode"):
        pass
    with pytest.raises(ValueError), metrics.timed("decode"):
        raise ValueError("bad image")
    assert _value("clip_stage_seconds_count", stage="decode") == before + 2


def test_exposition_reads_the_workers_folder_when_there_is_one(monkeypatch, tmp_path):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    text, content_type = metrics.exposition()
    assert content_type.startswith("text/plain") and b"clip_requests_total" in text
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))  # no worker has written anything yet
    text, _ = metrics.exposition()
    assert b"clip_" not in text, "under gunicorn only the workers' files count, not this process"
