"""Numbers from text within a range, with the one message style used by settings, options and CLI."""

from __future__ import annotations


def parse_in_range(raw: str, kind: type[int] | type[float], minimum: float, maximum: float | None = None,
                   above_minimum: bool = False) -> int | float:
    """`raw` as `kind` within the range; a ValueError's message completes "NAME=..."."""
    noun = "an integer" if kind is int else "a number"
    low = f"above {minimum:g}" if above_minimum else f"from {minimum:g}"
    allowed = f"{noun} {low}" + (f" to {maximum:g}" if maximum is not None else " up")
    try:
        value = kind(raw.strip())
    except ValueError:
        raise ValueError(f"{raw} is not {noun}; allowed: {allowed}") from None
    too_low = value <= minimum if above_minimum else value < minimum
    if value != value or too_low or (maximum is not None and value > maximum):  # NaN fails too
        raise ValueError(f"{raw} is out of range; allowed: {allowed}")
    return value
