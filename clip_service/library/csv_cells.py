"""CSV cells that a spreadsheet shows as text, never runs as a formula, and that read back as written."""

from __future__ import annotations

# A cell starting with one of these is a formula to a spreadsheet: a file named =HYPERLINK(...) would
# run as one when the output is opened. Such cells (and, to stay reversible, cells starting with ')
# are written with a leading ', which spreadsheets show as text.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def spreadsheet_safe(cell: str) -> str:
    return "'" + cell if cell.startswith(FORMULA_STARTS) else cell


def from_spreadsheet_safe(cell: str) -> str:
    """What spreadsheet_safe wrote, as it was."""
    return cell[1:] if cell.startswith("'") else cell
