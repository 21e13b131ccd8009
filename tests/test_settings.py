from pathlib import Path

import pytest

from clip_service.settings import Settings, SettingsError, load_settings, settings_from_mapping


def test_defaults_match_the_documented_contract():
    settings = settings_from_mapping({})
    assert (settings.port, settings.private, settings.clip_model) == (7778, False, "ViT-B/32")
    assert (settings.confidence_threshold, settings.max_predictions) == (0.01, 10)
    assert (settings.api_host, settings.api_port, settings.api_timeout) == ("localhost", 8080, 2.0)
    assert settings.max_image_bytes == 8 * 1024 * 1024
    assert settings.bind_host == "0.0.0.0"


def test_values_are_parsed():
    settings = settings_from_mapping({
        "PORT": "8000", "PRIVATE": "true", "CLIP_MODEL": "ViT-L/14@336px",
        "CLIP_CONFIDENCE_THRESHOLD": "0.2", "CLIP_MAX_PREDICTIONS": "3", "API_TIMEOUT": "0.5",
        "CLIP_DEVICE": "cuda:1", "URL_ALLOWLIST": "images.example, 10.0.0.0/8,[::1]",
        "ALLOWED_FILE_ROOTS": "/srv/photos,/tmp",
    })
    assert settings.port == 8000 and settings.private and settings.bind_host == "127.0.0.1"
    assert settings.model_spec.open_clip_name == "ViT-L-14-336-quickgelu"
    assert (settings.confidence_threshold, settings.max_predictions) == (0.2, 3)
    assert settings.device == "cuda:1"
    assert settings.url_allowlist == ("images.example", "10.0.0.0/8", "::1")
    assert settings.allowed_file_roots == (Path("/srv/photos").resolve(), Path("/tmp").resolve())


@pytest.mark.parametrize("variable, value, expected", [
    ("PORT", "abc", "PORT=abc is not an integer; allowed: an integer from 1 to 65535"),
    ("PORT", "70000", "PORT=70000 is out of range; allowed: an integer from 1 to 65535"),
    ("PRIVATE", "maybe", "PRIVATE=maybe is not a boolean; allowed: True or False"),
    ("CLIP_CONFIDENCE_THRESHOLD", "1.5", "CLIP_CONFIDENCE_THRESHOLD=1.5 is out of range"),
    ("CLIP_CONFIDENCE_THRESHOLD", "-0.1", "CLIP_CONFIDENCE_THRESHOLD=-0.1 is out of range"),
    ("CLIP_CONFIDENCE_THRESHOLD", "nan", "CLIP_CONFIDENCE_THRESHOLD=nan is out of range"),
    ("CLIP_CONFIDENCE_THRESHOLD", "high", "CLIP_CONFIDENCE_THRESHOLD=high is not a number"),
    ("CLIP_MAX_PREDICTIONS", "0", "CLIP_MAX_PREDICTIONS=0 is out of range; allowed: an integer from 1 up"),
    ("API_PORT", "http", "API_PORT=http is not an integer"),
    ("API_TIMEOUT", "0", "API_TIMEOUT=0 is out of range; allowed: a number above 0"),
    ("CLIP_MODEL", "ViT-B/33", "CLIP_MODEL=ViT-B/33 is not a known model; known: ViT-B/32, ViT-B/16, "),
    ("CLIP_MODEL", "ViT-B-32:nonsense", "CLIP_MODEL=ViT-B-32:nonsense is not a known pretrained tag"),
    ("CLIP_MODEL", "hf-hub:not a repo", "CLIP_MODEL=hf-hub:not a repo is not a Hugging Face repository"),
    ("CLIP_MODEL", "local-dir:/nonexistent", "CLIP_MODEL=local-dir:/nonexistent names no folder"),
    ("CLIP_DEVICE", "tpu", "CLIP_DEVICE=tpu is not a device; allowed: auto, cpu, cuda, cuda:N, mps"),
    ("CLIP_PROMPT_TEMPLATE", "a photo", "CLIP_PROMPT_TEMPLATE=a photo must contain exactly one {}"),
    ("CLIP_PROMPT_TEMPLATE", "a {0} photo of {}",
     "CLIP_PROMPT_TEMPLATE=a {0} photo of {} must contain exactly one {} where the label goes, and no"),
    ("CLIP_PROMPT_TEMPLATE", "a photo of {{}}",
     "CLIP_PROMPT_TEMPLATE=a photo of {{}} must contain exactly one {} where the label goes, and no"),
    ("MAX_IMAGE_BYTES", "12", "MAX_IMAGE_BYTES=12 is out of range"),
    ("ALLOWED_FILE_ROOTS", "photos", "ALLOWED_FILE_ROOTS=photos: photos is not an absolute path"),
    ("URL_ALLOWLIST", "10.0.0.0/33", "URL_ALLOWLIST=10.0.0.0/33: 10.0.0.0/33 is not an IP address"),
    ("LOG_LEVEL", "loud", "LOG_LEVEL=loud is not a log level"),
    ("CLIP_BACKEND", "onnx", "CLIP_BACKEND=onnx is not an engine; allowed: auto, torch, openvino"),
    ("CLIP_PRECISION", "int4", "CLIP_PRECISION=int4 is not a precision; allowed: auto, fp32, fp16, bf16, "
     "int8"),
])
def test_invalid_value_is_one_line_naming_variable_value_and_allowed(variable, value, expected):
    with pytest.raises(SettingsError) as caught:
        settings_from_mapping({variable: value})
    message = str(caught.value)
    assert message.startswith(expected)
    assert "\n" not in message


def test_engine_settings_are_parsed():
    assert settings_from_mapping({}).backend == "auto"
    chosen = settings_from_mapping({"CLIP_BACKEND": " OpenVINO ", "CLIP_PRECISION": "INT8"})
    assert (chosen.backend, chosen.precision) == ("openvino", "int8")
    assert settings_from_mapping({"CLIP_BACKEND": "torch", "CLIP_DEVICE": "cuda"}).device == "cuda"


@pytest.mark.parametrize("values, expected", [
    ({"CLIP_BACKEND": "openvino", "CLIP_DEVICE": "cuda:1"},
     "CLIP_BACKEND=openvino runs on the CPU, not CLIP_DEVICE=cuda:1; set CLIP_DEVICE=cpu"),
    ({"CLIP_BACKEND": "openvino", "CLIP_PRECISION": "fp16"},
     "CLIP_PRECISION=fp16 needs CUDA and CLIP_BACKEND=openvino runs on the CPU"),
    ({"CLIP_BACKEND": "torch", "CLIP_PRECISION": "int8"},
     "CLIP_PRECISION=int8 needs the OpenVINO engine on the CPU (it is CLIP_BACKEND=torch"),
    ({"CLIP_DEVICE": "cuda", "CLIP_PRECISION": "int8"},
     "CLIP_PRECISION=int8 needs the OpenVINO engine on the CPU (it is CLIP_BACKEND=auto, CLIP_DEVICE=cuda)"),
])
def test_engine_settings_that_cannot_work_together(values, expected):
    with pytest.raises(SettingsError) as caught:
        settings_from_mapping(values)
    assert str(caught.value).startswith(expected)


def test_openvino_asked_for_but_not_installed_says_how_to_install_it(monkeypatch):
    import clip_service.settings as settings_module

    monkeypatch.setattr(settings_module, "openvino_installed", lambda: False)
    with pytest.raises(SettingsError, match=r"CLIP_BACKEND=openvino but the openvino package is not "
                       r"installed; install it \(.venv/bin/pip install -r requirements.txt\)"):
        settings_from_mapping({"CLIP_BACKEND": "openvino"})
    with pytest.raises(SettingsError, match="CLIP_PRECISION=int8 needs the openvino package"):
        settings_from_mapping({"CLIP_PRECISION": "int8"})
    assert settings_from_mapping({}).backend == "auto", "auto falls back to torch without it"


def test_environment_wins_over_env_file(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("PORT=9000\nCLIP_MAX_PREDICTIONS=4\n")
    settings = load_settings(env_file, environ={"PORT": "9100"})
    assert settings.port == 9100
    assert settings.max_predictions == 4


def test_missing_env_file_means_defaults(tmp_path):
    assert load_settings(tmp_path / "absent.env", environ={}) == Settings()


def test_invalid_env_file_value_stops(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("PRIVATE=maybe\n")
    with pytest.raises(SettingsError, match="PRIVATE=maybe"):
        load_settings(env_file, environ={})


def test_env_example_documents_every_setting_and_is_valid(tmp_path):
    from clip_service.settings import ENV_VARIABLES, PROJECT_ROOT

    example = (PROJECT_ROOT / ".env.example").read_text()
    readme = (PROJECT_ROOT / "README.md").read_text()
    for variable in ENV_VARIABLES:
        assert variable in example, f"{variable} missing from .env.example"
        assert f"`{variable}`" in readme, f"{variable} missing from the README's table"
    settings = load_settings(PROJECT_ROOT / ".env.example", environ={})
    assert settings.port == 7778 and settings.prompt_template == "" and settings.cors_origins == ()


def test_reading_settings_imports_no_torch():
    """Tools that only read settings (and the settings' own validation of CLIP_MODEL) stay light."""
    import subprocess
    import sys

    code = ("import sys, clip_service.settings as s; s.settings_from_mapping({'CLIP_MODEL': 'ViT-L/14'}); "
            "print(sorted(name for name in ('torch', 'open_clip', 'flask') if name in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
