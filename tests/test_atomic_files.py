"""atomic_files.py: a file is replaced whole or kept as it was, and no temporary file stays behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from clip_service.atomic_files import write_atomically


def test_a_written_file_replaces_the_old_one_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "new" / "cache.bin"  # its folder is made
    write_atomically(path, lambda temporary: Path(temporary).write_bytes(b"first"))
    write_atomically(path, lambda temporary: Path(temporary).write_bytes(b"second"))
    assert path.read_bytes() == b"second"
    assert [entry.name for entry in path.parent.iterdir()] == ["cache.bin"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "index.clipindex"
    path.write_bytes(b"old")

    def half_then_fail(temporary: str) -> None:
        with open(temporary, "wb") as handle:
            handle.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(path, half_then_fail)
    assert path.read_bytes() == b"old"
    assert [entry.name for entry in tmp_path.iterdir()] == ["index.clipindex"]
