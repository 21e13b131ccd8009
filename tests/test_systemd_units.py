"""The shipped systemd units: valid for systemd, sandboxed (exposure 3.5 or lower), and still able to run.

`systemd-analyze verify` and `systemd-analyze security --offline=true` judge the files in services/
without a running systemd. Where systemd-analyze is missing (or older than 252, which added
--offline) the tests skip, except under CI=true, where they fail: CI must really check the units.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.guard import require_system_test

ROOT = Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "services").glob("*.service"))
INSTALL_DIR = "/opt/clip-service"
MAX_EXPOSURE = 3.5
EXPOSURE = re.compile(r"Overall exposure level for (\S+): (\d+\.\d+) (\w+)")


def _systemd_analyze() -> str:
    """The systemd-analyze binary, or a skip (a failure under CI) naming how to get it."""
    found = shutil.which("systemd-analyze")
    problem = None
    if found is None:
        problem = "systemd-analyze is not installed (apt-get install systemd; .ci/run installs it)"
    else:
        version = subprocess.run([found, "--version"], capture_output=True, text=True, check=True).stdout
        number = re.match(r"systemd (\d+)", version)
        if number is None or int(number[1]) < 252:
            problem = f"systemd-analyze {version.splitlines()[0]!r} is older than 252, which added --offline"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must check the systemd units: {problem}")
        pytest.skip(problem)
    return found


@pytest.fixture(scope="module")
def analyze() -> str:
    require_system_test("systemd-analyze")
    return _systemd_analyze()


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, errors="replace", timeout=120)


def _exposure(analyze: str, unit: Path) -> tuple[float, subprocess.CompletedProcess[str]]:
    result = _run([analyze, "security", "--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}",
                   str(unit)])
    found = EXPOSURE.search(result.stdout)
    assert found, f"no exposure level in the output for {unit.name}:\n{result.stdout}{result.stderr}"
    return float(found[2]), result


def _verify(analyze: str, unit: Path) -> list[str]:
    """Every problem `systemd-analyze verify` reports for the unit. It exits 0 even for an unknown key
    or a value it cannot parse (it only prints "..., ignoring"), so its output counts too."""
    result = _run([analyze, "verify", str(unit)])
    problems = [line for line in (result.stdout + result.stderr).splitlines() if "CLIP-api" in line]
    if result.returncode != 0:
        problems.append(f"exit status {result.returncode}: {result.stderr.strip()}")
    return problems


def _installed_copy(unit: Path, folder: Path) -> Path:
    """The unit with its install folder moved to a temporary one that holds what it names: an
    executable CLIP.sh, .env, and the template's instance files. Nothing else changes."""
    install = folder / "clip-service"
    (install / "instances").mkdir(parents=True)
    launcher = install / "CLIP.sh"
    launcher.write_text("#!/bin/sh\n")
    launcher.chmod(0o755)
    (install / ".env").write_text("")
    (install / "instances" / "0.env").write_text("PORT=7778\n")
    text = unit.read_text()
    assert INSTALL_DIR in text, f"{unit.name} no longer names {INSTALL_DIR}; update this test"
    copy = folder / unit.name
    copy.write_text(text.replace(INSTALL_DIR, str(install)))
    return copy


def _service_settings(unit: Path) -> dict[str, list[str]]:
    """[Service] assignments: key -> values in order (systemd keys may repeat)."""
    settings: dict[str, list[str]] = {}
    section = None
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
        elif section == "Service" and "=" in line and not line.startswith(("#", ";")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_both_shipped_units_are_checked():
    assert {"CLIP-api.service", "CLIP-api@.service"} <= {unit.name for unit in UNITS}


@pytest.mark.system
@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_unit_is_sandboxed(analyze, unit):
    exposure, result = _exposure(analyze, unit)
    print(f"{unit.name}: exposure {exposure} (at most {MAX_EXPOSURE})")
    assert exposure <= MAX_EXPOSURE, f"{unit.name} rates {exposure}:\n{result.stdout}"
    assert result.returncode == 0, f"--threshold refused {unit.name}:\n{result.stdout}{result.stderr}"


@pytest.mark.system
def test_threshold_refuses_an_unsandboxed_unit(analyze, tmp_path):
    """The same unit without its sandbox section rates far above the limit, and --threshold says so:
    the check above can fail."""
    text = (ROOT / "services" / "CLIP-api.service").read_text()
    bare = tmp_path / "CLIP-api.service"
    bare.write_text(text[:text.index("# --- Sandbox ---")] + text[text.index("[Install]"):])
    exposure, result = _exposure(analyze, bare)
    print(f"CLIP-api.service without its sandbox: exposure {exposure}")
    assert exposure > MAX_EXPOSURE
    assert result.returncode != 0


@pytest.mark.system
@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_unit_verifies(analyze, unit, tmp_path):
    assert _verify(analyze, _installed_copy(unit, tmp_path)) == []


@pytest.mark.system
def test_verify_reports_a_bad_directive(analyze, tmp_path):
    """systemd-analyze verify exits 0 for a misspelt key; _verify still reports it."""
    copy = _installed_copy(ROOT / "services" / "CLIP-api.service", tmp_path)
    misspelt = copy.read_text().replace("ProtectSystem=strict", "ProtectSystem=strict\nProtectSystm=yes")
    copy.write_text(misspelt)
    problems = _verify(analyze, copy)
    assert any("ProtectSystm" in problem for problem in problems), problems


@pytest.mark.parametrize("unit", UNITS, ids=lambda unit: unit.name)
def test_units_keep_what_the_service_needs(unit):
    """A lower score is easy to buy by breaking the service; these are the things it cannot lose."""
    settings = _service_settings(unit)

    def last(key: str, default: str = "") -> str:
        return settings.get(key, [default])[-1]

    assert last("ExecStart") == f"{INSTALL_DIR}/CLIP.sh"
    assert last("User") == "clip"
    assert last("ExecReload") == "/bin/kill -HUP $MAINPID"
    # torch's CPU kernels (oneDNN) are compiled at run time into writable-executable memory.
    assert last("MemoryDenyWriteExecute", "no") in ("no", "false")
    # AMX detection reads /proc/cpuinfo; CUDA reads /proc/driver/nvidia.
    assert last("ProcSubset", "all") == "all"
    # The GPU: a private /dev has no /dev/nvidia*, and the device filter must let them through.
    assert last("PrivateDevices", "no") in ("no", "false")
    assert last("DevicePolicy") == "closed"
    assert "char-nvidia* rw" in settings.get("DeviceAllow", [])
    # It listens on TCP, fetches image URLs and logs to journald.
    families = last("RestrictAddressFamilies").split()
    assert {"AF_INET", "AF_INET6", "AF_UNIX"} <= set(families) and not families[0].startswith("~")
    assert last("PrivateNetwork", "no") in ("no", "false")
    # Weights and label features are written under HOME, which StateDirectory= keeps writable.
    assert "HOME=/var/lib/clip-service" in settings.get("Environment", [])
    assert last("StateDirectory") == "clip-service"
    assert last("ProtectSystem") == "strict"
    # The Prometheus multiprocess folder and gunicorn's heartbeat files go to a private /tmp.
    assert last("PrivateTmp") == "yes"
