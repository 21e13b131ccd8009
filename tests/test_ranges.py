"""ranges.py: numbers within a range, with one message style that names the allowed values."""

import math

import pytest

from clip_service.ranges import parse_in_range


def test_values_within_the_range_are_parsed():
    assert parse_in_range(" 7 ", int, 1, 10) == 7 and isinstance(parse_in_range("7", int, 1, 10), int)
    assert parse_in_range("0.5", float, 0.0, 1.0) == 0.5
    assert parse_in_range("1e9", float, 0.0) == 1e9 and math.isinf(parse_in_range("inf", float, 0.0))
    assert parse_in_range("0", float, 0.0, 1.0) == 0.0 and parse_in_range("1", float, 0.0, 1.0) == 1.0


@pytest.mark.parametrize("raw, kind, minimum, maximum, above, message", [
    ("x", int, 1, 10, False, "x is not an integer; allowed: an integer from 1 to 10"),
    ("1.5", int, 1, 10, False, "1.5 is not an integer"),
    ("high", float, 0.0, 1.0, False, "high is not a number; allowed: a number from 0 to 1"),
    ("11", int, 1, 10, False, "11 is out of range; allowed: an integer from 1 to 10"),
    ("0", int, 1, None, False, "0 is out of range; allowed: an integer from 1 up"),
    ("0", float, 0.0, 300.0, True, "0 is out of range; allowed: a number above 0 to 300"),
    ("nan", float, 0.0, 1.0, False, "nan is out of range"),
    ("inf", float, 0.0, 1.0, False, "inf is out of range"),
])
def test_values_outside_are_refused_with_the_allowed_range(raw, kind, minimum, maximum, above, message):
    with pytest.raises(ValueError) as caught:
        parse_in_range(raw, kind, minimum, maximum, above)
    assert str(caught.value).startswith(message)
