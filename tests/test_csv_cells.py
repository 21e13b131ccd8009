"""library/csv_cells.py: a cell a spreadsheet would run as a formula is written as text, and reads back
as it was."""

import pytest

from clip_service.library.csv_cells import from_spreadsheet_safe, spreadsheet_safe


@pytest.mark.parametrize("cell", ["=HYPERLINK(\"x\")", "+1", "-cmd", "@SUM(A1)", "\tx", "\rx", "'quoted"])
def test_formula_starts_are_written_as_text(cell):
    assert spreadsheet_safe(cell) == "'" + cell
    assert from_spreadsheet_safe(spreadsheet_safe(cell)) == cell


@pytest.mark.parametrize("cell", ["plain.png", "sub/photo 1.jpg", "", "a=b", "x'"])
def test_other_cells_are_left_as_they_are(cell):
    assert spreadsheet_safe(cell) == cell
    assert from_spreadsheet_safe(cell) == cell
