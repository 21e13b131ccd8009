"""The vocabulary's text features: each label under the prompt templates, cached on disk between restarts.

The cache key covers the model's identity, the prompt template and every label, so changing any of
them can never reuse features computed for something else. A cache file carries a checksum of its
features; a corrupt or truncated file is rebuilt, never used.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from clip_service.atomic_files import write_atomically
from clip_service.engines.base import TextEncoder
from clip_service.errors import DeadlineExceeded
from clip_service.vocabulary.labels import LabelSet

log = logging.getLogger(__name__)

DEADLINE_BATCH = 16  # texts per forward pass when a deadline is checked between passes
CACHE_FORMAT = "clip-service-label-features-v1"


def cache_key(model_identity: str, templates: tuple[str, ...], texts: tuple[str, ...]) -> str:
    digest = hashlib.sha256()
    for part in (CACHE_FORMAT, model_identity, str(len(templates)), *templates, *texts):
        digest.update(part.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


def ensemble_features(encoder: TextEncoder, texts: tuple[str, ...], templates: tuple[str, ...],
                      deadline: float | None = None) -> torch.Tensor:
    """(L, D): for each text, the normalised mean of its unit features under every template.

    With a `deadline` (time.monotonic()), texts go to the model a few at a time and no batch starts
    after the deadline, so a request's own labels never hold the model much past its time.
    """
    step = len(texts) if deadline is None else DEADLINE_BATCH
    total = None
    for template in templates:
        parts = []
        for start in range(0, len(texts), max(step, 1)):
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded("Encoding the request's labels took longer than REQUEST_TIMEOUT")
            parts.append(encoder.encode_texts([template.format(text) for text in texts[start:start + step]]))
        features = torch.cat(parts)  # (L, D)
        total = features if total is None else total + features
    return torch.nn.functional.normalize(total, dim=-1)


def _checksum(features: torch.Tensor) -> str:
    return hashlib.sha256(features.contiguous().numpy().tobytes()).hexdigest()


def _read_cache(path: Path, key: str, count: int) -> torch.Tensor | None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        features = load_file(str(path))["features"]
    except FileNotFoundError:
        return None
    except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as error:
        log.warning("Label-feature cache %s is unreadable (%s); rebuilding it", path, error)
        return None
    if (metadata.get("key") != key or features.dtype != torch.float32 or features.ndim != 2
            or features.shape[0] != count or metadata.get("sha256") != _checksum(features)):
        log.warning("Label-feature cache %s does not match its checksum or key; rebuilding it", path)
        return None
    return features


def _write_cache(path: Path, key: str, features: torch.Tensor) -> None:
    """Write atomically (temp file + rename); a read-only or full disk only costs the cache."""
    try:
        metadata = {"key": key, "sha256": _checksum(features)}
        write_atomically(path, lambda temporary: save_file({"features": features.contiguous()}, temporary,
                                                           metadata=metadata))
    except OSError as error:
        log.warning("Could not write the label-feature cache %s (%s); it will be recomputed at the "
                    "next start", path, error)


@dataclass(frozen=True)
class Vocabulary:
    """A label set with its text features, and the version clients see (a short hash)."""

    label_set: LabelSet
    features: torch.Tensor  # (L, D) float32 unit features
    templates: tuple[str, ...]
    version: str

    def features_by_text(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.label_set.texts, self.features, strict=True))

    @functools.cached_property
    def text_rows(self) -> dict[str, int]:
        """Each text the model reads -> its row in `features` (the first, if labels share a text)."""
        rows: dict[str, int] = {}
        for index, text in enumerate(self.label_set.texts):
            rows.setdefault(text, index)
        return rows

    @functools.cached_property
    def group_rows(self) -> dict[str, list[int]]:
        """Each group's rows in `features`, computed once per vocabulary rather than per request."""
        row = {label: index for index, label in enumerate(self.label_set.labels)}
        return {group: [row[label] for label in labels] for group, labels in self.label_set.groups.items()}


def build_vocabulary(encoder: TextEncoder, label_set: LabelSet, templates: tuple[str, ...],
                     cache_dir: Path, reuse: dict[str, torch.Tensor] | None = None) -> Vocabulary:
    """Text features of every label under the templates, from the disk cache when it matches.

    `reuse` maps texts to features already computed with the same model and templates, so a
    reload encodes only new or changed labels.
    """
    key = cache_key(encoder.identity, templates, label_set.texts)
    path = Path(cache_dir) / f"label-features-{key[:32]}.safetensors"
    features = _read_cache(path, key, len(label_set))
    if features is not None:
        log.info("Loaded %d label features from %s", len(label_set), path)
    else:
        reuse = reuse or {}
        missing = list(dict.fromkeys(text for text in label_set.texts if text not in reuse))
        log.info("Encoding %d labels with %d prompt templates", len(missing), len(templates))
        encoded = dict(zip(missing, ensemble_features(encoder, tuple(missing), templates), strict=True)) \
            if missing else {}
        features = torch.stack([encoded[text] if text in encoded else reuse[text]
                                for text in label_set.texts])
        _write_cache(path, key, features)
    return Vocabulary(label_set, features, templates, key[:12])

