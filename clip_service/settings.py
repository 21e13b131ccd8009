"""All configuration, read from `.env` and the environment and validated in one place.

The process environment wins over `.env`. Any invalid value stops start-up with one line that names
the variable, the value and what is allowed. Importing this module imports no torch: tools that only
read settings stay light.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dotenv import dotenv_values

from clip_service.engines.spec import ModelSpec, ModelSpecError, parse_model_spec
from clip_service.ranges import parse_in_range
from clip_service.vocabulary.labels import puts_the_label_in

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ENV_FILE = PROJECT_ROOT / ".env"

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")
BACKENDS = ("auto", "torch", "openvino")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


class SettingsError(ValueError):
    """An invalid setting; the message is the one line shown at start-up."""


@dataclass(frozen=True)
class Settings:
    port: int = 7778
    private: bool = False
    clip_model: str = "ViT-B/32"
    confidence_threshold: float = 0.01
    max_predictions: int = 10
    api_host: str = "localhost"
    api_port: int = 8080
    api_timeout: float = 2.0
    device: str = "auto"
    precision: str = "auto"  # fp16 on CUDA; on a CPU bf16 where it has bf16 instructions, else fp32
    backend: str = "auto"  # what runs the model: OpenVINO on a CPU when installed, else torch
    labels_dir: Path = PROJECT_ROOT / "labels"
    prompt_template: str = ""  # one template instead of prompts_file, e.g. the seed's
    cache_dir: Path = Path.home() / ".cache" / "clip-service"
    emoji_dictionary: Path = PROJECT_ROOT / "labels" / "emoji.json"
    emoji_retry_seconds: float = 30.0
    max_image_bytes: int = 8 * 1024 * 1024
    max_image_pixels: int = 60_000_000
    decode_memory_mb: int = 1024  # memory one worker's decodes may hold at once (inputs/budget.py)
    allowed_file_roots: tuple[Path, ...] = ()
    url_allowlist: tuple[str, ...] = ()
    url_timeout: float = 10.0
    workers: int = 0
    threads: int = 0
    log_level: str = "INFO"
    log_format: str = "text"
    batch_max_size: int = 0  # 0: 8 on a CPU, 64 on a GPU
    batch_wait_ms: float = 2.0
    torch_threads: int = 0  # 0: the cores divided by the workers
    max_queue: int = 32
    labels_token_budget: int = 4096  # tokens of new labels x templates one request may have encoded
    request_timeout: float = 30.0
    api_key: str = ""
    cors_origins: tuple[str, ...] = ()  # browsers' cross-origin use: none unless named
    allowed_hosts: tuple[str, ...] = ()  # empty: loopback names when PRIVATE=True, any host otherwise
    health_canary_seconds: float = 30.0
    labels_watch: bool = False
    trusted_proxies: int = 0  # reverse proxies in front whose X-Forwarded-For is believed
    prompts_file: Path = PROJECT_ROOT / "prompts" / "ensemble.txt"
    batch_files_max: int = 32  # images in one /analyze/batch or /embed request
    search_index: Path | None = None  # a photo index (python -m clip_service index) for /search

    @property
    def model_spec(self) -> ModelSpec:
        return parse_model_spec(self.clip_model)

    @property
    def serving_threads(self) -> int:
        """Threads per worker that run requests: THREADS, or 16 (never more than MAX_QUEUE).

        16 is twice the CPU's batch of 8: one full batch waits for the model while the next is read
        and decoded (with 8 threads, under load, forward passes averaged 4 images; bench/RESULTS.md).
        """
        return self.threads or min(16, self.max_queue)

    @property
    def answered_hosts(self) -> tuple[str, ...]:
        """The Host names the service answers to: ALLOWED_HOSTS, or by default loopback names on a
        private service (a public one is reached under names the operator chose)."""
        if self.allowed_hosts:
            return self.allowed_hosts
        return LOOPBACK_HOSTS if self.private else ("*",)

    @property
    def bind_host(self) -> str:
        return "127.0.0.1" if self.private else "0.0.0.0"


def _integer(name: str, raw: str, minimum: int, maximum: int | None = None) -> int:
    try:
        return parse_in_range(raw, int, minimum, maximum)
    except ValueError as error:
        raise SettingsError(f"{name}={error}") from None


def _number(name: str, raw: str, minimum: float, maximum: float | None = None,
            exclusive_minimum: bool = False) -> float:
    try:
        return parse_in_range(raw, float, minimum, maximum, exclusive_minimum)
    except ValueError as error:
        raise SettingsError(f"{name}={error}") from None


def _boolean(name: str, raw: str) -> bool:
    word = raw.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise SettingsError(f"{name}={raw} is not a boolean; allowed: True or False")


def _device(raw: str) -> str:
    word = raw.strip().lower()
    if word in ("auto", "cpu", "cuda", "mps"):
        return word
    if word.startswith("cuda:") and word[5:].isdigit():
        return word
    raise SettingsError(f"CLIP_DEVICE={raw} is not a device; allowed: {', '.join(DEVICE_CHOICES)}")


def _precision(raw: str) -> str:
    word = raw.strip().lower()
    if word not in PRECISIONS:
        raise SettingsError(f"CLIP_PRECISION={raw} is not a precision; allowed: {', '.join(PRECISIONS)}")
    return word


def _backend(raw: str) -> str:
    word = raw.strip().lower()
    if word not in BACKENDS:
        raise SettingsError(f"CLIP_BACKEND={raw} is not an engine; allowed: {', '.join(BACKENDS)}")
    return word


def openvino_installed() -> bool:
    """Whether the openvino package can be imported, without importing it (settings stay light)."""
    return importlib.util.find_spec("openvino") is not None


def _template(raw: str) -> str:
    if raw.strip() and not puts_the_label_in(raw):
        raise SettingsError(
            f"CLIP_PROMPT_TEMPLATE={raw} must contain exactly one {{}} where the label goes, and no other "
            "braces, e.g. 'a photo of a {}.'"
        )
    return raw


def _list(raw: str) -> list[str]:
    return [item.strip() for item in raw.split(",") if item.strip()]


def _allowlist(raw: str) -> tuple[str, ...]:
    """Host names, IP addresses or CIDR networks that `url=` may reach despite the SSRF guard."""
    entries = []
    for item in _list(raw):
        if "/" in item or item.replace(".", "").isdigit() or ":" in item:
            try:
                ipaddress.ip_network(item.strip("[]"), strict=False)
            except ValueError:
                raise SettingsError(
                    f"URL_ALLOWLIST={raw}: {item} is not an IP address or network; "
                    "allowed: comma-separated host names, IP addresses or CIDR networks"
                ) from None
        entries.append(item.lower().strip("[]"))
    return tuple(entries)


def _roots(raw: str) -> tuple[Path, ...]:
    roots = []
    for item in _list(raw):
        path = Path(item).expanduser()
        if not path.is_absolute():
            raise SettingsError(f"ALLOWED_FILE_ROOTS={raw}: {item} is not an absolute path; "
                                "allowed: comma-separated absolute folder paths")
        roots.append(path.resolve())
    return tuple(roots)


def _log_level(raw: str) -> str:
    word = raw.strip().upper()
    if word not in LOG_LEVELS:
        raise SettingsError(f"LOG_LEVEL={raw} is not a log level; allowed: {', '.join(LOG_LEVELS)}")
    return word


def _log_format(raw: str) -> str:
    word = raw.strip().lower()
    if word not in ("text", "json"):
        raise SettingsError(f"LOG_FORMAT={raw} is not a log format; allowed: text or json")
    return word


def _origins(raw: str) -> tuple[str, ...]:
    origins = tuple(_list(raw))
    for origin in origins:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise SettingsError(f"CORS_ORIGINS={raw}: {origin} is not an origin; allowed: *, or "
                                "comma-separated origins such as https://photos.example.com")
    return origins


def _hosts(raw: str) -> tuple[str, ...]:
    hosts = []
    for item in _list(raw):
        name = item.strip("[]").rstrip(".").lower()
        if item != "*" and (not name or any(c in name for c in "/:@ ") and not _is_ip(name)):
            raise SettingsError(f"ALLOWED_HOSTS={raw}: {item} is not a host name; allowed: *, or "
                                "comma-separated names or addresses such as clip.example.com,127.0.0.1")
        hosts.append(name if item != "*" else "*")
    return tuple(hosts)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _model(raw: str) -> str:
    try:
        parse_model_spec(raw)
    except ModelSpecError as error:
        raise SettingsError(str(error)) from None
    return raw.strip()


def _path(raw: str) -> Path:
    return Path(raw).expanduser().resolve()


_PARSERS = {
    "PORT": ("port", lambda raw: _integer("PORT", raw, 1, 65535)),
    "PRIVATE": ("private", lambda raw: _boolean("PRIVATE", raw)),
    "CLIP_MODEL": ("clip_model", _model),
    "CLIP_CONFIDENCE_THRESHOLD": (
        "confidence_threshold", lambda raw: _number("CLIP_CONFIDENCE_THRESHOLD", raw, 0.0, 1.0)),
    "CLIP_MAX_PREDICTIONS": ("max_predictions", lambda raw: _integer("CLIP_MAX_PREDICTIONS", raw, 1)),
    "API_HOST": ("api_host", str.strip),
    "API_PORT": ("api_port", lambda raw: _integer("API_PORT", raw, 1, 65535)),
    "API_TIMEOUT": ("api_timeout", lambda raw: _number("API_TIMEOUT", raw, 0.0, 300.0, True)),
    "CLIP_DEVICE": ("device", _device),
    "CLIP_PRECISION": ("precision", _precision),
    "CLIP_BACKEND": ("backend", _backend),
    "CLIP_LABELS_DIR": ("labels_dir", _path),
    "CLIP_PROMPT_TEMPLATE": ("prompt_template", _template),
    "CLIP_CACHE_DIR": ("cache_dir", _path),
    "EMOJI_DICTIONARY": ("emoji_dictionary", _path),
    "EMOJI_RETRY_SECONDS": (
        "emoji_retry_seconds", lambda raw: _number("EMOJI_RETRY_SECONDS", raw, 0.0, None, True)),
    "MAX_IMAGE_BYTES": ("max_image_bytes", lambda raw: _integer("MAX_IMAGE_BYTES", raw, 1024)),
    "MAX_IMAGE_PIXELS": ("max_image_pixels", lambda raw: _integer("MAX_IMAGE_PIXELS", raw, 1)),
    "DECODE_MEMORY_MB": ("decode_memory_mb", lambda raw: _integer("DECODE_MEMORY_MB", raw, 16, 1 << 20)),
    "ALLOWED_FILE_ROOTS": ("allowed_file_roots", _roots),
    "URL_ALLOWLIST": ("url_allowlist", _allowlist),
    "URL_TIMEOUT": ("url_timeout", lambda raw: _number("URL_TIMEOUT", raw, 0.0, 300.0, True)),
    "WORKERS": ("workers", lambda raw: _integer("WORKERS", raw, 0, 256)),
    "THREADS": ("threads", lambda raw: _integer("THREADS", raw, 0, 256)),
    "LOG_LEVEL": ("log_level", _log_level),
    "LOG_FORMAT": ("log_format", _log_format),
    "BATCH_MAX_SIZE": ("batch_max_size", lambda raw: _integer("BATCH_MAX_SIZE", raw, 0, 4096)),
    "BATCH_WAIT_MS": ("batch_wait_ms", lambda raw: _number("BATCH_WAIT_MS", raw, 0.0, 1000.0)),
    "TORCH_THREADS": ("torch_threads", lambda raw: _integer("TORCH_THREADS", raw, 0, 1024)),
    "MAX_QUEUE": ("max_queue", lambda raw: _integer("MAX_QUEUE", raw, 1, 100_000)),
    "LABELS_TOKEN_BUDGET": (
        "labels_token_budget", lambda raw: _integer("LABELS_TOKEN_BUDGET", raw, 0, 10_000_000)),
    "REQUEST_TIMEOUT": (
        "request_timeout", lambda raw: _number("REQUEST_TIMEOUT", raw, 0.0, 3600.0, True)),
    "API_KEY": ("api_key", str.strip),
    "CORS_ORIGINS": ("cors_origins", _origins),
    "ALLOWED_HOSTS": ("allowed_hosts", _hosts),
    "HEALTH_CANARY_SECONDS": (
        "health_canary_seconds", lambda raw: _number("HEALTH_CANARY_SECONDS", raw, 0.0, 86400.0)),
    "CLIP_LABELS_WATCH": ("labels_watch", lambda raw: _boolean("CLIP_LABELS_WATCH", raw)),
    "CLIP_PROMPTS_FILE": ("prompts_file", _path),
    "TRUSTED_PROXIES": ("trusted_proxies", lambda raw: _integer("TRUSTED_PROXIES", raw, 0, 10)),
    "BATCH_FILES_MAX": ("batch_files_max", lambda raw: _integer("BATCH_FILES_MAX", raw, 1, 1024)),
    "SEARCH_INDEX": ("search_index", _path),
}
ENV_VARIABLES = tuple(_PARSERS)
KEEP_EMPTY = {"CORS_ORIGINS"}  # empty is a real value here: no cross-origin access


def settings_from_mapping(values: Mapping[str, str | None]) -> Settings:
    """Settings from variable names to raw strings; absent or empty values keep their defaults."""
    fields = {}
    for variable, (field, parse) in _PARSERS.items():
        raw = values.get(variable)
        if raw is None or (raw.strip() == "" and variable not in KEEP_EMPTY):
            continue
        fields[field] = parse(raw)
    return _check_combinations(Settings(**fields))


def _check_combinations(settings: Settings) -> Settings:
    """Settings that are each valid but cannot work together."""
    if settings.threads > settings.max_queue:
        raise SettingsError(
            f"THREADS={settings.threads} exceeds MAX_QUEUE={settings.max_queue}: at most MAX_QUEUE "
            "requests are in progress in a worker, so the extra threads would never run; lower THREADS "
            "or raise MAX_QUEUE")
    _check_engine(settings)
    return settings


def _check_engine(settings: Settings) -> None:
    """CLIP_BACKEND, CLIP_DEVICE and CLIP_PRECISION that no engine can honour together."""
    backend, device, precision = settings.backend, settings.device, settings.precision
    if backend == "openvino" and device not in ("auto", "cpu"):
        raise SettingsError(f"CLIP_BACKEND=openvino runs on the CPU, not CLIP_DEVICE={device}; set "
                            "CLIP_DEVICE=cpu (or auto), or CLIP_BACKEND=torch for the GPU")
    if backend == "openvino" and not openvino_installed():
        raise SettingsError("CLIP_BACKEND=openvino but the openvino package is not installed; install it "
                            "(.venv/bin/pip install -r requirements.txt) or set CLIP_BACKEND=auto or torch")
    if backend == "openvino" and precision == "fp16":
        raise SettingsError("CLIP_PRECISION=fp16 needs CUDA and CLIP_BACKEND=openvino runs on the CPU; "
                            "use auto, fp32, bf16 or int8")
    if precision == "int8":
        if backend == "torch" or device not in ("auto", "cpu"):
            raise SettingsError(f"CLIP_PRECISION=int8 needs the OpenVINO engine on the CPU (it is "
                                f"CLIP_BACKEND={backend}, CLIP_DEVICE={device}); set CLIP_BACKEND=openvino "
                                "or auto, and CLIP_DEVICE=cpu or auto")
        if not openvino_installed():
            raise SettingsError("CLIP_PRECISION=int8 needs the openvino package, which is not installed; "
                                "install it (.venv/bin/pip install -r requirements.txt) or use auto or fp32")


def load_settings(env_file: str | os.PathLike | None = None,
                  environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from `.env` (CLIP_ENV_FILE or the project's own) overlaid by the environment."""
    environ = os.environ if environ is None else environ
    path = Path(env_file or environ.get("CLIP_ENV_FILE") or DEFAULT_ENV_FILE)
    values: dict[str, str | None] = dict(dotenv_values(path)) if path.is_file() else {}
    values.update({name: environ[name] for name in ENV_VARIABLES if name in environ})
    return settings_from_mapping(values)
