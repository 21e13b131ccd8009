"""Finding a library's files: every image under a folder, in a stable order, hidden names left out."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"})


def find_candidates(folder: Path, all_files: bool = False, exclude: Path | None = None) -> list[Path]:
    """Files under folder, relative to it, sorted by path; hidden folders and files are left out.

    Hidden names are skipped because they are tool droppings (`.thumbnails/`, macOS `._IMG_0001.JPG`
    resource forks), not photos. Symlinked folders are not entered (a link up the tree would loop
    forever); symlinked files are read. `exclude` is the output file, which may live in the folder.
    """
    excluded = exclude.resolve() if exclude is not None else None
    found = []

    def unreadable(error: OSError) -> None:
        log.warning("Cannot list %s: %s", error.filename, error.strerror)

    for root, dirs, files in os.walk(folder, onerror=unreadable):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        for name in files:
            path = Path(root, name)
            if name.startswith(".") or not (all_files or path.suffix.lower() in IMAGE_EXTENSIONS):
                continue
            if excluded is not None and name == excluded.name and path.resolve() == excluded:
                continue
            found.append(path.relative_to(folder))
    return sorted(found, key=lambda path: path.parts)


def record_key(relative: Path) -> str:
    """The `path` written for a file: relative to FOLDER with `/`, so a moved library still resumes."""
    return relative.as_posix()
