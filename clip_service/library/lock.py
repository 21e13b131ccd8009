"""One run per output file: an exclusive lock taken before the file is read or cut.

Without fcntl (Windows) two runs on one output are not caught.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO

from clip_service.library.errors import LibraryError

try:
    import fcntl
except ImportError:
    fcntl = None


def lock_exclusive(raw: IO[bytes], path: Path) -> None:
    """Lock the open file for this process, or raise LibraryError if another run holds it."""
    if fcntl is None:
        return
    try:
        fcntl.flock(raw.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise LibraryError(f"{path} is being written by another tagger run") from None
