"""Per-request options of /analyze: threshold, limit, labels and groups, read and validated.

Flask-free: the values come through `get(name)`, which returns every value given for a name.
"""

from __future__ import annotations

from collections.abc import Callable, Collection

from clip_service.errors import BadInput
from clip_service.ranges import parse_in_range
from clip_service.tasks.classify import ClassifyOptions

MAX_REQUEST_LABELS = 100
MAX_LABEL_CHARACTERS = 64


def single_value(get: Callable[[str], list[str]], name: str) -> str | None:
    """The one value given for name, None if absent; a parameter given twice is a 400."""
    values = get(name)
    if len(values) > 1:
        raise BadInput(f"Give {name} only once; it was given {len(values)} times")
    return values[0] if values else None


def _in_range(name: str, raw: str, kind: type, minimum: float, maximum: float) -> float:
    try:
        return parse_in_range(raw, kind, minimum, maximum)
    except ValueError as error:
        raise BadInput(f"{name}={error}") from None


def _items(raw: str) -> list[str]:
    return [" ".join(item.split()) for item in raw.split(",") if item.strip()]


def parse_options(get: Callable[[str], list[str]], default_threshold: float, max_predictions: int,
                  known_groups: Collection[str]) -> ClassifyOptions:
    """Options from request values (`get(name)` -> every value given for name)."""
    threshold, limit = default_threshold, max_predictions
    raw = single_value(get, "threshold")
    if raw is not None:
        threshold = _in_range("threshold", raw, float, 0.0, 1.0)
    raw = single_value(get, "limit")
    if raw is not None:
        limit = _in_range("limit", raw, int, 1, max_predictions)
    labels = groups = None
    raw = single_value(get, "labels")
    if raw is not None:
        labels = tuple(dict.fromkeys(_items(raw)))
        if not labels:
            raise BadInput("labels is empty; give comma-separated labels, e.g. labels=cat,dog")
        if len(labels) > MAX_REQUEST_LABELS:
            raise BadInput(f"labels has {len(labels)} labels; the limit is {MAX_REQUEST_LABELS}")
        long = [label for label in labels if len(label) > MAX_LABEL_CHARACTERS]
        if long:
            raise BadInput(f"labels: {long[0][:80]!r} is longer than {MAX_LABEL_CHARACTERS} characters")
    raw = single_value(get, "groups")
    if raw is not None:
        groups = tuple(dict.fromkeys(_items(raw)))
        unknown = [group for group in groups if group not in known_groups]
        if unknown or not groups:
            raise BadInput(f"groups: {unknown[0] if unknown else '(empty)'} is not a label group; "
                           f"known: {', '.join(sorted(known_groups))}")
    if labels is not None and groups is not None:
        raise BadInput("Give labels or groups, not both")
    return ClassifyOptions(threshold, limit, labels, groups)
