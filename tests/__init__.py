"""The test suite. A package, so tests/support/ is importable as tests.support (by tests and by bench/)
and no test module can import another: shared code lives in tests/support/, fixtures in conftest.py."""
