"""Checks that run once before serving, in the process that starts the server.

Under gunicorn they run in the master, before any worker forks, so an invalid setting or missing
weights stop start-up with one clear line instead of a crash loop of workers. No CUDA is touched.
"""

from __future__ import annotations

import sys

from clip_service.engines.base import ModelLoadError
from clip_service.engines.weights import fetch_weights
from clip_service.settings import Settings, SettingsError, load_settings
from clip_service.vocabulary.labels import LabelsError, load_labels, load_templates


def preflight() -> Settings:
    """Validated settings whose labels load and whose weights are on disk (downloading them)."""
    settings = load_settings()
    load_labels(settings.labels_dir)
    load_templates(settings.prompts_file, settings.prompt_template)
    fetch_weights(settings.model_spec)
    return settings


def preflight_or_exit() -> Settings:
    try:
        return preflight()
    except (SettingsError, LabelsError, ModelLoadError) as error:
        print(f"clip-service: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
