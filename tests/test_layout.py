"""The layout shows the architecture: each room of clip_service/ imports only the rooms below it, and
the ground-floor modules import no room at all (runtime/cores.py, imported from inputs, tasks and
library, was the one fault: it is clip_service/cores.py now)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "clip_service"
ROOMS = ["engines", "inputs", "vocabulary", "tasks", "library", "runtime", "http"]  # bottom to top
GROUND = ["errors.py", "metrics.py", "ranges.py", "atomic_files.py", "cores.py"]


def imported_rooms(source: Path) -> set[str]:
    """The rooms (folders of clip_service) a module imports, wherever in it the import is."""
    found = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == "clip_service" and len(parts) > 1 and (PACKAGE / parts[1]).is_dir():
                found.add(parts[1])
    return found


def test_every_room_is_placed():
    assert sorted(ROOMS) == sorted(path.name for path in PACKAGE.iterdir()
                                   if path.is_dir() and (path / "__init__.py").exists())


def test_no_room_imports_one_above_it():
    faults = []
    for level, room in enumerate(ROOMS):
        for source in sorted((PACKAGE / room).rglob("*.py")):
            above = imported_rooms(source) & set(ROOMS[level + 1:])
            faults += [f"{source.relative_to(PACKAGE)} imports {name}" for name in sorted(above)]
    assert faults == []


def test_the_ground_floor_imports_no_room():
    faults = [f"{name} imports {sorted(imported_rooms(PACKAGE / name))}" for name in GROUND
              if imported_rooms(PACKAGE / name)]
    assert faults == []
