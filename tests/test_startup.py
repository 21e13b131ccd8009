"""startup.py: the checks before serving stop start-up with one line naming what is wrong, never a
traceback, and hand over the validated settings when all is well."""

from __future__ import annotations

import pytest

from clip_service.startup import preflight_or_exit


@pytest.fixture
def environment(clean_env, tiny_model_dir, labels_dir):
    clean_env.setenv("CLIP_MODEL", f"local-dir:{tiny_model_dir}")
    clean_env.setenv("CLIP_LABELS_DIR", str(labels_dir))
    return clean_env


def test_valid_settings_labels_and_weights_pass(environment, tiny_model_dir, capsys):
    settings = preflight_or_exit()
    assert settings.clip_model == f"local-dir:{tiny_model_dir}"
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("variable, value, start", [
    ("MAX_QUEUE", "many", "clip-service: MAX_QUEUE=many is not an integer"),
    ("CLIP_MODEL", "local-dir:/nowhere", "clip-service: CLIP_MODEL=local-dir:/nowhere names no folder"),
    ("CLIP_PROMPT_TEMPLATE", "no placeholder", "clip-service: CLIP_PROMPT_TEMPLATE"),
])
def test_a_bad_setting_stops_start_up_with_one_line(environment, capsys, variable, value, start):
    environment.setenv(variable, value)
    with pytest.raises(SystemExit) as stopped:
        preflight_or_exit()
    assert stopped.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(start), line


def test_a_labels_folder_without_labels_stops_start_up(environment, tmp_path, capsys):
    environment.setenv("CLIP_LABELS_DIR", str(tmp_path))
    with pytest.raises(SystemExit):
        preflight_or_exit()
    assert "No labels loaded" in capsys.readouterr().err


def test_a_model_folder_without_weights_stops_start_up(environment, tiny_model_dir, tmp_path, capsys):
    (tmp_path / "open_clip_config.json").write_text((tiny_model_dir / "open_clip_config.json").read_text())
    environment.setenv("CLIP_MODEL", f"local-dir:{tmp_path}")
    with pytest.raises(SystemExit):
        preflight_or_exit()
    assert "holds no weights" in capsys.readouterr().err
