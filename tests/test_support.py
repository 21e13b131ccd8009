"""The suite's own rules and the helpers every test leans on (tests/support/): a helper that cannot
fail, or a rule nobody checks, would let the rest of the suite pass for the wrong reason."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import requests
from flask import Flask, Response

from clip_service.settings import ENV_VARIABLES
from tests.support.nginx import require_nginx
from tests.support.responses import assert_error, assert_success
from tests.support.server import NO_ENV_FILE, STARTUP_VARIABLES, clean_environment, start

ROOT = Path(__file__).resolve().parent.parent
TEST_MODULE = ("test_", "conftest")


# Modules tested in a file named for something else: the room they share with others, or the command.
# Every other module clip_service/<room>/<name>.py has its own tests/test_<name>.py. The test file
# imports the module, or (testing it through HTTP) names it in its docstring, as "http/access.py".
TESTED_IN = {
    "__main__.py": "test_tagger.py", "cli.py": "test_tagger.py",
    "engines/base.py": "test_engines.py", "engines/registry.py": "test_engines.py",
    "engines/spec.py": "test_engines.py", "engines/from_spec.py": "test_engines.py",
    "engines/torch_engine.py": "test_model.py",
    "engines/openvino_export.py": "test_openvino_engine.py", "engines/openvino_import.py":
    "test_openvino_engine.py", "engines/text_prefix.py": "test_openvino_engine.py",
    "engines/tokens.py": "test_openvino_engine.py",
    "engines/weights.py": "test_model.py",
    "http/analyze.py": "test_routes.py", "http/current.py": "test_app.py",
    "http/errors.py": "test_http_errors.py",
    "http/logs.py": "test_observability.py", "http/page.py": "test_web.py",
    "inputs/images.py": "test_image_input.py", "inputs/thumbnails.py": "test_search.py",
    "library/batches.py": "test_index.py", "library/indexer.py": "test_index.py",
    "library/photo_index.py": "test_index.py",
    "library/errors.py": "test_library.py", "library/output.py": "test_library.py",
    "library/pipeline.py": "test_library.py", "library/resume.py": "test_tagger.py",
    "library/walk.py": "test_tagger.py",
    "runtime/admission.py": "test_runtime.py", "runtime/health.py": "test_runtime.py",
    "runtime/host.py": "test_runtime.py",
    "tasks/classify.py": "test_scoring.py",
    "vocabulary/features.py": "test_labels.py", "vocabulary/reload.py": "test_options.py",
}


def _imported_modules(path: Path) -> list[str]:
    """Every module `path` imports, and for `from x import y` also x.y (y may be a module)."""
    modules = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            prefix = "." * node.level + (node.module or "")
            modules += [prefix] + [f"{prefix}.{alias.name}".replace("..", ".") for alias in node.names]
    return modules


def test_every_module_has_a_test_file_that_imports_it():
    package = ROOT / "clip_service"
    missing = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package).as_posix()
        if path.name == "__init__.py":
            continue
        test_file = ROOT / "tests" / TESTED_IN.get(relative, f"test_{path.stem}.py")
        dotted = "clip_service." + relative.removesuffix(".py").replace("/", ".")
        if not test_file.exists():
            missing.append(f"{relative}: no {test_file.name}")
        elif not (dotted in _imported_modules(test_file)
                  or relative in (ast.get_docstring(ast.parse(test_file.read_text(encoding="utf-8"))) or "")
                  or (path.name == "__main__.py" and '"-m", "clip_service"' in test_file.read_text())):
            missing.append(f"{relative}: {test_file.name} neither imports {dotted} nor names {relative}")
    assert missing == [], "add the test file, or name the file that tests it in TESTED_IN"
    assert all((package / module).exists() for module in TESTED_IN), "TESTED_IN names a module that is gone"


def test_no_test_module_imports_another_and_shared_code_lives_in_support():
    """A helper a test file defines and another imports is shared code: it belongs in tests/support/."""
    offenders = []
    for path in sorted([*(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").glob("*.py")]):
        for module in _imported_modules(path):
            if module.lstrip(".").removeprefix("tests.").startswith(TEST_MODULE):
                offenders.append(f"{path.relative_to(ROOT)} imports {module}")
    assert offenders == []


def test_nothing_reaches_the_tests_through_sys_path():
    """tests/ and bench/ are packages: `tests.support...` from the repository root, never a path hack."""
    hack = "sys.path" + ".insert"
    files = [*(ROOT / "tests").rglob("*.py"), *(ROOT / "bench").glob("*.py")]
    assert [str(path.relative_to(ROOT)) for path in files if hack in path.read_text(encoding="utf-8")] == []


def test_the_system_marker_is_registered():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert "--strict-markers" in text and '"system:' in text


def test_clean_environment_drops_every_setting_and_reads_no_env_file(monkeypatch):
    for name in (*ENV_VARIABLES, *STARTUP_VARIABLES):
        monkeypatch.setenv(name, "from-the-shell")
    monkeypatch.setenv("CLIP_VENV", "/opt/venv")
    monkeypatch.setenv("UNRELATED_VARIABLE", "kept")
    env = clean_environment({"MAX_QUEUE": "4"})
    assert {name for name in ENV_VARIABLES if name in env} == {"MAX_QUEUE"}
    assert env["MAX_QUEUE"] == "4" and env["CLIP_ENV_FILE"] == NO_ENV_FILE
    assert "GUNICORN_CMD_ARGS" not in env and "PROMETHEUS_MULTIPROC_DIR" not in env
    assert env["CLIP_VENV"] == "/opt/venv" and env["UNRELATED_VARIABLE"] == "kept"


def test_a_test_not_marked_system_cannot_start_a_server_or_nginx(tmp_path):
    with pytest.raises(AssertionError, match=r"starts CLIP\.sh, so it is a whole-system test"):
        start({}, tmp_path / "server.log")
    with pytest.raises(AssertionError, match="starts nginx"):
        require_nginx()
    assert not (tmp_path / "server.log").exists(), "nothing was started"


# --- the response checker, on answers it must refuse ------------------------------------------------


SUCCESS = {"service": "clip", "status": "success",
           "predictions": [{"label": "cat", "confidence": 0.75, "emoji": "🐱"},
                           {"label": "dog", "confidence": 0.25}],
           "metadata": {"processing_time": 0.012, "model_info": {
               "framework": "OpenCLIP", "model": "local-dir:tiny", "device": "cpu", "labels_version": "abc"}}}
ERROR = {"service": "clip", "status": "error", "predictions": [], "error": {"message": "Not an image: x"},
         "metadata": {"processing_time": 0.001}}


def _answer(status: int, body, content_type: str = "application/json"):
    """The same answer through Flask's test client and as a requests.Response."""
    app = Flask(__name__)
    text = body if isinstance(body, str) else json.dumps(body)
    app.add_url_rule("/", view_func=lambda: Response(text, status, content_type=content_type))
    flask_answer = app.test_client().get("/")
    http_answer = requests.Response()
    http_answer.status_code, http_answer._content = status, text.encode()
    http_answer.headers["Content-Type"] = content_type
    return flask_answer, http_answer


def _changed(body: dict, path: tuple, value) -> dict:
    body = json.loads(json.dumps(body))
    node = body
    for key in path[:-1]:
        node = node[key]
    if value is KeyError:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return body


def test_the_checker_accepts_the_contract():
    for answer in _answer(200, SUCCESS):
        assert assert_success(answer) == SUCCESS
    for answer in _answer(400, ERROR):
        assert assert_error(answer, 400, "Not an image") == "Not an image: x"


@pytest.mark.parametrize("status, body, content_type", [
    (201, SUCCESS, "application/json"),
    (200, SUCCESS, "text/html"),
    (200, _changed(SUCCESS, ("extra",), 1), "application/json"),
    (200, _changed(SUCCESS, ("metadata", "model_info", "framework"), "OpenAI"), "application/json"),
    (200, _changed(SUCCESS, ("metadata", "processing_time"), "fast"), "application/json"),
    (200, _changed(SUCCESS, ("predictions", 1, "confidence"), 0.8), "application/json"),  # not sorted
    (200, _changed(SUCCESS, ("predictions", 0, "confidence"), 0.7512), "application/json"),  # not rounded
    (200, _changed(SUCCESS, ("predictions", 0, "emoji"), None), "application/json"),
    (200, _changed(SUCCESS, ("predictions", 0, "score"), 1.0), "application/json"),
    (200, "<html>ok</html>", "application/json"),
], ids=["status", "content-type", "extra-key", "framework", "time", "unsorted", "unrounded", "null-emoji",
        "prediction-key", "not-json"])
def test_the_success_checker_refuses(status, body, content_type):
    for answer in _answer(status, body, content_type):
        with pytest.raises(AssertionError):
            assert_success(answer)


@pytest.mark.parametrize("body, content_type, fragment", [
    (ERROR, "application/json", "not an image"),  # fragments match as the client reads them
    (ERROR, "text/plain", "Not an image"),
    (_changed(ERROR, ("predictions",), [{"label": "cat", "confidence": 1.0}]), "application/json", ""),
    (_changed(ERROR, ("metadata", "model_info"), {}), "application/json", ""),
    (_changed(ERROR, ("metadata", "processing_time"), KeyError), "application/json", ""),
    (_changed(ERROR, ("error", "message"), "Traceback (most recent call last):"), "application/json", ""),
    (_changed(ERROR, ("error", "message"), ""), "application/json", ""),
    (_changed(ERROR, ("error", "detail"), "x"), "application/json", ""),
    (_changed(ERROR, ("status",), "success"), "application/json", ""),
], ids=["case", "content-type", "predictions", "model-info", "no-time", "traceback", "empty", "extra",
        "status-word"])
def test_the_error_checker_refuses(body, content_type, fragment):
    for answer in _answer(400, body, content_type):
        with pytest.raises(AssertionError):
            assert_error(answer, 400, *([fragment] if fragment else []))
    for answer in _answer(400, ERROR):
        with pytest.raises(AssertionError):
            assert_error(answer, 404)
