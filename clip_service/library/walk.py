"""Finding a library's files: every image under a folder, in a stable order, hidden names left out."""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp"})


def find_candidates(folder: Path, all_files: bool = False, exclude: tuple[Path, ...] = ()) -> list[Path]:
    """Files under folder, relative to it, sorted by path; hidden folders and files are left out.

    Hidden names are skipped because they are tool droppings (`.thumbnails/`, macOS `._IMG_0001.JPG`
    resource forks), not photos. Symlinked folders are not entered (a link up the tree would loop
    forever); symlinked files are listed (`index` then reads only those that stay inside folder).
    `exclude` holds the run's own files (its output), which may live in the folder.
    """
    excluded = {path.resolve() for path in exclude}
    excluded_names = {path.name for path in excluded}
    found = []

    for root, files in _walk(folder):
        for name in files:
            path = Path(root, name)
            if name.startswith(".") or not (all_files or path.suffix.lower() in IMAGE_EXTENSIONS):
                continue
            if name in excluded_names and path.resolve() in excluded:
                continue
            found.append(path.relative_to(folder))
    return sorted(found, key=lambda path: path.parts)


def _walk(folder: Path):
    """(folder, names of its files) for folder and every folder under it that is neither hidden nor a
    symlink; os.walk's view of it, but with a list of folders to visit instead of recursion (Python
    3.11's os.walk recurses, and a tree 1,000 folders deep ended the run with RecursionError)."""
    waiting = [str(folder)]
    while waiting:
        root = waiting.pop()
        try:
            with os.scandir(root) as entries:
                listed = list(entries)
        except OSError as error:
            log.warning("Cannot list %s: %s", error.filename, error.strerror)
            continue
        files = []
        for entry in listed:
            try:
                is_folder = entry.is_dir()
            except OSError:
                is_folder = False
            if not is_folder:
                files.append(entry.name)
            elif not entry.name.startswith(".") and not entry.is_symlink():
                waiting.append(entry.path)
        yield root, files


def record_key(relative: Path) -> str:
    """The `path` written for a file: relative to FOLDER with `/`, so a moved library still resumes."""
    return relative.as_posix()


def find_pending(folder: Path, all_files: bool, done: set[str], exclude: tuple[Path, ...] = (),
                 ) -> tuple[list[Path], list[Path]]:
    """(candidates, pending): the files under folder, and those whose record_key is not in `done`.

    Finding no file at all is worth a warning that says which files are looked for.
    """
    candidates = find_candidates(folder, all_files, exclude)
    if not candidates:
        log.warning("No %s found under %s", "files" if all_files else
                    f"image files ({', '.join(sorted(IMAGE_EXTENSIONS))}; --all-files tries every file)",
                    folder)
    return candidates, [relative for relative in candidates if record_key(relative) not in done]
