"""Which CLIP model to run, where to get its weights, and the engine that runs it.

Nothing here touches CUDA at import time: gunicorn forks workers after importing the app, and CUDA
does not survive a fork. The model is created by `load_engine`, once per worker.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from open_clip.transformer import text_global_pool
from PIL import Image
from torchvision.transforms import Compose, Normalize, ToTensor

log = logging.getLogger(__name__)

# OpenAI's names -> open_clip architecture. OpenAI trained with QuickGELU, so the -quickgelu configs
# are the ones that reproduce its weights exactly.
OPENAI_MODELS = {
    "ViT-B/32": "ViT-B-32-quickgelu",
    "ViT-B/16": "ViT-B-16-quickgelu",
    "ViT-L/14": "ViT-L-14-quickgelu",
    "ViT-L/14@336px": "ViT-L-14-336-quickgelu",
    "RN50": "RN50-quickgelu",
    "RN101": "RN101-quickgelu",
    "RN50x4": "RN50x4-quickgelu",
    "RN50x16": "RN50x16-quickgelu",
    "RN50x64": "RN50x64-quickgelu",
}
KNOWN_FORMS = (
    ", ".join(OPENAI_MODELS)
    + ", an open_clip ARCH:PRETRAINED pair (e.g. ViT-B-32:laion2b_s34b_b79k), hf-hub:org/repo"
    " or local-dir:/path"
)
WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pth")
_HF_REPO = re.compile(r"^[\w.-]+/[\w.-]+$")

WEIGHTS_HELP = (
    "Provide the weights: start once with network access so they are downloaded into the cache "
    "(HF_HOME, default ~/.cache/huggingface), set HF_HUB_OFFLINE=1 to use only that cache, "
    "or set CLIP_MODEL=local-dir:/path to a folder holding open_clip_config.json and "
    "open_clip_model.safetensors"
)


class ModelLoadError(RuntimeError):
    """The model or its weights could not be had; the message says how to provide them."""


@dataclass(frozen=True)
class ModelSpec:
    """A parsed CLIP_MODEL value: what open_clip is asked for."""

    name: str  # as the operator wrote it
    open_clip_name: str  # model_name for open_clip (may carry hf-hub: or local-dir:)
    pretrained: str | None  # pretrained tag when open_clip_name is a built-in architecture

    @property
    def framework(self) -> str:
        return "OpenAI" if self.pretrained == "openai" else "OpenCLIP"

    @property
    def local_dir(self) -> Path | None:
        prefix = open_clip.factory.LOCAL_DIR_PREFIX
        return Path(self.open_clip_name[len(prefix):]) if self.open_clip_name.startswith(prefix) else None


def _weights_in(folder: Path) -> list[Path]:
    return sorted(path for pattern in WEIGHT_FILES for path in folder.glob(pattern))


def parse_model_spec(raw: str) -> ModelSpec:
    """Parse CLIP_MODEL; a ValueError's message completes "CLIP_MODEL=<raw> ..."."""
    name = raw.strip()
    if name in OPENAI_MODELS:
        return ModelSpec(name, OPENAI_MODELS[name], "openai")
    if name.startswith("hf-hub:"):
        if not _HF_REPO.match(name[len("hf-hub:"):]):
            raise ValueError("is not a Hugging Face repository; allowed: hf-hub:org/repo")
        return ModelSpec(name, name, None)
    if name.startswith("local-dir:"):
        folder = Path(name[len("local-dir:"):]).expanduser()
        if not folder.is_dir():
            raise ValueError("names no folder; allowed: local-dir:/path to a folder holding "
                             "open_clip_config.json and open_clip_model.safetensors")
        if not (folder / "open_clip_config.json").is_file():
            raise ValueError("has no open_clip_config.json; a local-dir: folder holds "
                             "open_clip_config.json and open_clip_model.safetensors")
        if not _weights_in(folder):
            raise ValueError("holds no weights (open_clip_model.safetensors); a randomly initialised "
                             "model is never served")
        return ModelSpec(name, f"local-dir:{folder.resolve()}", None)
    if name.count(":") == 1:
        arch, tag = name.split(":")
        if (arch, tag) in open_clip.list_pretrained():
            return ModelSpec(name, arch, tag)
        tags = open_clip.list_pretrained_tags_by_model(arch)
        if tags:
            raise ValueError(f"is not a known pretrained tag of {arch}; known: {', '.join(tags)}")
    raise ValueError(f"is not a known model; known: {KNOWN_FORMS}")


def model_identity(spec: ModelSpec) -> str:
    """A string that changes whenever the weights may have changed; keys the label-feature cache."""
    folder = spec.local_dir
    if folder is None:
        return f"{spec.open_clip_name}|{spec.pretrained}"
    digest = hashlib.sha256((folder / "open_clip_config.json").read_bytes())
    for path in _weights_in(folder):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return f"local-dir:{folder}|{digest.hexdigest()}"


def fetch_weights(spec: ModelSpec) -> None:
    """Download the weights into the cache (with a progress bar) without building the model.

    Run in the gunicorn master before workers fork, so a missing download stops start-up once,
    with a clear message, and workers find the weights cached.
    """
    try:
        if spec.pretrained is not None:
            cfg = open_clip.get_pretrained_cfg(spec.open_clip_name, spec.pretrained)
            open_clip.download_pretrained(cfg)
        elif spec.open_clip_name.startswith("hf-hub:"):
            repo = spec.open_clip_name[len("hf-hub:"):]
            open_clip.factory._get_hf_config(repo)
            open_clip.pretrained.download_pretrained_from_hf(repo)
    except Exception as error:  # every hub/network/cache failure means the same to the operator
        raise ModelLoadError(
            f"Weights for CLIP_MODEL={spec.name} could not be loaded ({type(error).__name__}: "
            f"{_first_line(error)}). {WEIGHTS_HELP}"
        ) from error


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]


def resolve_device(setting: str) -> torch.device:
    """CUDA when present, else Apple MPS, else CPU; CLIP_DEVICE overrides."""
    if setting == "auto":
        if torch.cuda.is_available():
            setting = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            setting = "mps"
        else:
            setting = "cpu"
    if setting.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ModelLoadError(f"CLIP_DEVICE={setting} but CUDA is not available; use auto or cpu")
        index = int(setting.partition(":")[2] or torch.cuda.current_device())
        return torch.device("cuda", index)
    if setting == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("CLIP_DEVICE=mps but Apple MPS is not available; use auto or cpu")
    return torch.device(setting)


def split_preprocess(preprocess) -> tuple[Callable, tuple[float, ...], tuple[float, ...]] | None:
    """open_clip's eval transform -> (its PIL steps, mean, std), or None if it is not that shape.

    The PIL steps (resize, crop) run on the CPU and end in uint8; the float conversion and
    normalisation then run on the model's device, on the whole batch at once.
    """
    steps = list(getattr(preprocess, "transforms", []))
    to_tensor = [i for i, step in enumerate(steps) if isinstance(step, ToTensor)]
    if len(to_tensor) != 1 or len(steps) != to_tensor[0] + 2 or not isinstance(steps[-1], Normalize):
        return None
    pil_steps, normalize = steps[:to_tensor[0]], steps[-1]
    return Compose(pil_steps), tuple(normalize.mean), tuple(normalize.std)


class ClipEngine:
    """One loaded CLIP model: prepares images and turns images and texts into unit features."""

    def __init__(self, model: torch.nn.Module, preprocess, tokenizer, spec: ModelSpec,
                 device: torch.device):
        self.model = model.eval()
        self.preprocess_transform = preprocess
        self.tokenizer = tokenizer
        self.spec = spec
        self.device = device
        visual = getattr(model, "visual", model)
        self.dtype = next(visual.parameters()).dtype  # the image tower's; the text tower may differ
        text_dtype = next(model.token_embedding.parameters()).dtype if hasattr(
            model, "token_embedding") else next(model.parameters()).dtype
        # Text features computed in another precision or device kind are not the same features.
        self.identity = f"{model_identity(spec)}|text:{device.type}:{text_dtype}"
        preprocess_cfg = open_clip.get_model_preprocess_cfg(model)
        self.resize_mode = preprocess_cfg.get("resize_mode", "shortest")
        # open_clip's eval transform: bilinear when asked for, bicubic otherwise ("random" included)
        bilinear = preprocess_cfg.get("interpolation") == "bilinear"
        self._resample = Image.Resampling.BILINEAR if bilinear else Image.Resampling.BICUBIC
        size = preprocess_cfg.get("size", 224)
        self.input_size = (size, size) if isinstance(size, int) else tuple(size)  # (H, W)
        split = split_preprocess(preprocess)
        self._pil_steps = split[0] if split else None
        mean, std = (split[1], split[2]) if split else ((0.0,) * 3, (1.0,) * 3)
        # (1, 3, 1, 1) in float32, so they broadcast over a uint8 batch normalised on the device
        self._mean = torch.tensor(mean, device=device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(std, device=device).view(1, 3, 1, 1) * 255
        # Text encoding runs at start-up and for per-request labels; one at a time.
        self._text_lock = threading.Lock()
        with torch.inference_mode():
            self.logit_scale = float(model.logit_scale.exp())
            bias = getattr(model, "logit_bias", None)
            self.logit_bias = float(bias) if bias is not None else None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def framework(self) -> str:
        return self.spec.framework

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """An RGB image -> the model's input, resized and cropped: (3, H, W), uint8 when possible."""
        if self._pil_steps is None:
            return self.preprocess_transform(image)
        resized = self._resize_extreme_aspect(image) or self._pil_steps(image)
        array = np.array(resized, dtype=np.uint8)  # (H, W, 3), writable
        return torch.from_numpy(array).permute(2, 0, 1)

    def _resize_extreme_aspect(self, image: Image.Image) -> Image.Image | None:
        """Resize and centre-crop in one step for very long or tall images; None for the rest.

        Resizing the short side of a 1 x 100,000 image to 224 first, as the plain transform does,
        would build a 224 x 22,400,000 image (gigabytes). Resizing only the box that the centre crop
        keeps, at the same scale, gives the same pixels.
        """
        width, height = image.size
        short, long = min(width, height), max(width, height)
        side = self.input_size[0]
        if self.resize_mode != "shortest" or long <= 4 * short or self.input_size[0] != self.input_size[1]:
            return None
        new_long = int(side * long / short)  # torchvision's Resize(side) output, long axis
        top = int(round((new_long - side) / 2.0))  # torchvision's CenterCrop offset
        scale = long / new_long
        start, end = top * scale, (top + side) * scale
        box = (start, 0, end, height) if width > height else (0, start, width, end)
        return image.resize((side, side), self._resample, box=box)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """open_clip's own full transform: (3, H, W) float, normalised. The reference path."""
        return self.preprocess_transform(image)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) from `prepare` (uint8) or `preprocess` (float) -> (N, D) unit float32 on CPU."""
        with torch.inference_mode():
            pixels = pixels.to(self.device, non_blocking=True)
            if pixels.dtype == torch.uint8:
                pixels = (pixels.float() - self._mean) / self._std
            features = self.model.encode_image(pixels.to(self.dtype))
            return torch.nn.functional.normalize(features.float(), dim=-1).cpu()

    def encode_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """N texts -> (N, D) unit float32 features on the CPU.

        Texts are sorted by token length and each batch is cut to its longest text: CLIP's text
        tower is causal and pooled at the end-of-text token, so padding after it changes nothing
        but costs most of the time (labels are 5-10 tokens of a 77-token context).
        """
        tokens = self.tokenizer(texts)  # (N, context); the tokenizer cuts what does not fit
        lengths = self._token_lengths(tokens)
        if lengths is not None and bool((lengths == tokens.shape[1]).any()):
            cut = [text for text, length in zip(texts, lengths.tolist(), strict=True)
                   if length == tokens.shape[1]]
            log.warning("%d text(s) fill the model's %d-token context and may have been cut, e.g. %r",
                        len(cut), tokens.shape[1], cut[0][:80])
        order = torch.argsort(lengths) if lengths is not None else torch.arange(len(texts))
        features = [None] * len(texts)
        with self._text_lock, torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                index = order[start:start + batch_size]
                batch = tokens[index]
                if lengths is not None:
                    batch = batch[:, :int(lengths[index].max())]
                encoded = self._encode_tokens(batch.to(self.device))
                encoded = torch.nn.functional.normalize(encoded.float(), dim=-1).cpu()
                for position, row in zip(index.tolist(), encoded, strict=True):
                    features[position] = row
        return torch.stack(features)

    def _token_lengths(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Tokens up to and including end-of-text, when the model allows cutting there; else None."""
        model = self.model
        if (type(model) is not open_clip.CLIP or getattr(model, "text_pool_type", None) != "argmax"
                or getattr(model, "attn_mask", None) is None or tokens.ndim != 2):
            return None
        return tokens.argmax(dim=-1) + 1  # end-of-text has the highest id in CLIP's vocabulary

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """open_clip's CLIP.encode_text for a context cut to tokens.shape[1] positions."""
        model = self.model
        length = tokens.shape[1]
        if self._token_lengths(tokens) is None or length == model.positional_embedding.shape[0]:
            return model.encode_text(tokens)
        cast_dtype = model.transformer.get_cast_dtype()
        x = model.token_embedding(tokens).to(cast_dtype)  # (N, L, width)
        x = x + model.positional_embedding[:length].to(cast_dtype)
        x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
        x = model.ln_final(x)
        x = text_global_pool(x, tokens, "argmax")  # (N, width)
        if isinstance(model.text_projection, torch.nn.Linear):
            return model.text_projection(x)
        return x @ model.text_projection


def cpu_has_amx_bf16() -> bool:
    """Intel AMX tiles make bf16 matrix work several times faster than fp32 on the CPU."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
            return any(line.startswith("flags") and " amx_bf16" in line for line in handle)
    except OSError:
        return False


def resolve_precision(setting: str, device: torch.device) -> str:
    """fp16 on CUDA; bf16 for the image tower on CPUs with AMX; else fp32. CLIP_PRECISION overrides."""
    if setting == "auto":
        if device.type == "cuda":
            return "fp16"
        return "bf16" if device.type == "cpu" and cpu_has_amx_bf16() else "fp32"
    if setting == "fp16" and device.type != "cuda":
        raise ModelLoadError(f"CLIP_PRECISION=fp16 needs CUDA, and the device is {device}; "
                             "use auto, fp32 or bf16")
    return setting


def load_engine(spec: ModelSpec, device_setting: str = "auto", precision_setting: str = "auto",
                ) -> ClipEngine:
    """Build the model on its device in its precision. Never returns a randomly initialised model.

    On the CPU, bf16 applies to the image tower only: it is what runs per request, while label
    text features (computed once and cached) keep full precision.
    """
    device = resolve_device(device_setting)
    precision = resolve_precision(precision_setting, device)
    log.info("Loading CLIP_MODEL=%s (%s) on %s in %s", spec.name, spec.framework, device, precision)
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.open_clip_name, pretrained=spec.pretrained, device=device,
            precision="fp32" if device.type == "cpu" else precision, require_pretrained=True,
        )
        tokenizer = open_clip.get_tokenizer(spec.open_clip_name)
    except ModelLoadError:
        raise
    except Exception as error:
        raise ModelLoadError(
            f"CLIP_MODEL={spec.name} could not be loaded ({type(error).__name__}: "
            f"{_first_line(error)}). {WEIGHTS_HELP}"
        ) from error
    if device.type == "cpu" and precision == "bf16":
        model.visual.to(torch.bfloat16)
    return ClipEngine(model, preprocess, tokenizer, spec, device)
