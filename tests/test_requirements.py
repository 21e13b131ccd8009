"""What the package imports is what requirements.txt declares, and it imports on a system without fcntl."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_module_level_import_is_a_declared_requirement():
    """tqdm was imported by library/batches.py and installed only because something else needed it."""
    declared = {_normalised(re.split(r"[<>=!~\s\[;#]", line.strip(), maxsplit=1)[0])
                for line in (ROOT / "requirements.txt").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")}
    distributions = importlib.metadata.packages_distributions()
    missing = {}
    for source in (ROOT / "clip_service").rglob("*.py"):
        for node in ast.parse(source.read_text()).body:  # module level only: guarded imports are optional
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("clip_service", "__future__"):
                    continue
                owners = {_normalised(owner) for owner in distributions.get(top, [top])}
                if not owners & declared:
                    missing.setdefault(top, source.relative_to(ROOT).as_posix())
    assert missing == {}, f"imported but not in requirements.txt: {missing}"


def test_the_openvino_export_imports_and_locks_without_fcntl(tmp_path):
    """fcntl exists on POSIX only; library/lock.py guards its import, the OpenVINO export did not."""
    script = ("import sys; sys.modules['fcntl'] = None\n"
              "from pathlib import Path\n"
              "from clip_service.engines import openvino_export\n"
              "assert openvino_export.fcntl is None\n"
              f"with openvino_export._locked(Path({str(tmp_path / 'lock')!r})):\n"
              "    print('converted')\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout == "converted\n", result.stderr[-2000:]
