"""Only tests marked `system` start servers or system programs, so `pytest -m "not system"` starts none.

tests/conftest.py says, before each test's fixtures are set up, whether that test is marked; the
helpers that start CLIP.sh, REST.py, nginx, chromium or systemd-analyze call require_system_test
first. Outside pytest (bench/) nothing is set and everything may start. No pytest import: bench/
imports the server helpers on machines without the test tools.
"""

from __future__ import annotations

running_test: str | None = None  # the node id being set up; None outside pytest
running_test_is_system = True


def require_system_test(what: str) -> None:
    if not running_test_is_system:
        raise AssertionError(f"{running_test} starts {what}, so it is a whole-system test: mark it "
                             "@pytest.mark.system (or pytestmark = pytest.mark.system for its module)")
