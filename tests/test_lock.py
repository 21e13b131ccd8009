"""library/lock.py: one run per output file; a second run on the same file is refused, not interleaved."""

import pytest

from clip_service.library.errors import LibraryError
from clip_service.library.lock import fcntl, lock_exclusive


@pytest.mark.skipif(fcntl is None, reason="no fcntl (Windows): the lock is documented as absent there")
def test_a_second_run_on_the_same_output_is_refused_until_the_first_ends(tmp_path):
    path = tmp_path / "tags.jsonl"
    path.write_bytes(b"")
    with path.open("rb+") as first:
        lock_exclusive(first, path)
        with path.open("rb+") as second, pytest.raises(LibraryError, match="being written by another"):
            lock_exclusive(second, path)
    with path.open("rb+") as third:
        lock_exclusive(third, path)
