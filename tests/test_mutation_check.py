"""The planted bugs of tests/mutation_check.py still apply to the code, so they cannot silently rot.

Running the mutants takes minutes (`.venv/bin/python tests/mutation_check.py`, run by CI); this only
checks, in milliseconds, that every mutant still finds its snippet and names tests that exist.
"""

import re

from tests.mutation_check import MUTANTS, ROOT, check_snippets


def test_every_snippet_occurs_exactly_once():
    assert check_snippets(MUTANTS) == []


def test_every_selection_names_existing_tests():
    for mutant in MUTANTS:
        assert mutant.tests, f"{mutant.name} names no tests"
        for selection in mutant.tests:
            path, _, test = selection.partition("::")
            source = (ROOT / path).read_text(encoding="utf-8")
            assert path.startswith("tests/test_") and path.endswith(".py"), selection
            if test:
                assert re.search(rf"^def {re.escape(test.split('[')[0])}\(", source, re.MULTILINE), \
                    f"{mutant.name}: {selection} is not a test of {path}"


def test_mutant_names_are_unique():
    names = [mutant.name for mutant in MUTANTS]
    assert len(names) == len(set(names))


def test_readme_reports_every_mutant():
    testing = (ROOT / "README.md").read_text(encoding="utf-8").split("## Testing", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in testing.splitlines() if line.startswith("| ") and "`test_" in line]
    assert f"all {len(MUTANTS)} caught" in testing
    assert len(rows) == len(MUTANTS), "one README row per planted bug"
    files = {mutant.name: mutant.path.removeprefix("clip_service/") for mutant in MUTANTS}
    for row in rows:  # | `name` | what a user suffers | file | the test that caught it |
        name, _, file, _ = (cell.strip() for cell in row.strip("| ").split(" | "))
        assert files.get(name.strip("`")) == file, f"README row names another mutant or file: {row}"
