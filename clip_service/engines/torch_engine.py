"""The open_clip engine on torch: device and precision choice, model loading, image and text encoding.

Nothing here touches CUDA at import time: gunicorn forks workers after importing the app, and CUDA
does not survive a fork. The model is created by `load_torch_engine`, once per worker.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import open_clip
import torch
from open_clip.transformer import text_global_pool
from PIL import Image
from torchvision.transforms import Compose, Normalize, ToTensor

from clip_service.engines.base import EngineOutOfMemory, ModelLoadError
from clip_service.engines.from_spec import EngineFromSpec
from clip_service.engines.preprocess import InputGeometry
from clip_service.engines.spec import ModelSpec, model_identity
from clip_service.engines.tokens import encode_in_length_batches
from clip_service.engines.weights import weights_error

log = logging.getLogger(__name__)

BACKEND = "torch"


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


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def release_memory() -> None:
    """Only after an out-of-memory error: hand cached blocks back so a smaller batch may fit."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class TorchEngine(EngineFromSpec):
    """One loaded open_clip model on its torch device (the Engine protocol)."""

    backend = BACKEND

    def __init__(self, model: torch.nn.Module, preprocess, tokenizer, spec: ModelSpec,
                 device: torch.device):
        self.model = model.eval()
        self.preprocess_transform = preprocess
        self.tokenizer = tokenizer
        self.spec = spec
        self.device = device
        self.device_name, self.device_kind = str(device), device.type
        visual = getattr(model, "visual", model)
        self.dtype = next(visual.parameters()).dtype  # the image tower's; the text tower may differ
        self.precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.dtype, "fp32")
        text_dtype = next(model.token_embedding.parameters()).dtype if hasattr(
            model, "token_embedding") else next(model.parameters()).dtype
        # Text features computed in another precision or device kind are not the same features.
        self.identity = f"{model_identity(spec)}|text:{device.type}:{text_dtype}"
        self.geometry = InputGeometry.from_open_clip(open_clip.get_model_preprocess_cfg(model))
        self.input_size, self.resize_mode = self.geometry.input_size, self.geometry.resize_mode
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

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """An RGB image -> the model's input, resized and cropped: (3, H, W), uint8 when possible."""
        if self._pil_steps is None:
            return self.preprocess_transform(image)
        return super().prepare(image)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """open_clip's own full transform: (3, H, W) float, normalised. The reference path."""
        return self.preprocess_transform(image)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) from `prepare` (uint8) or `preprocess` (float) -> (N, D) unit float32 on CPU."""
        try:
            with torch.inference_mode():
                pixels = pixels.to(self.device, non_blocking=True)
                if pixels.dtype == torch.uint8:
                    pixels = (pixels.float() - self._mean) / self._std
                features = self.model.encode_image(pixels.to(self.dtype))
                return torch.nn.functional.normalize(features.float(), dim=-1).cpu()
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            release_memory()
            raise EngineOutOfMemory(f"{self.device_name} ran out of memory on a batch of "
                                    f"{pixels.shape[0]}: {error}") from error

    def encode_texts(self, texts: list[str], batch_size: int = 256) -> torch.Tensor:
        """N texts -> (N, D) unit float32 features on the CPU, in batches cut to their length."""
        tokens = self.tokenizer(texts)  # (N, context); the tokenizer cuts what does not fit
        with self._text_lock, torch.inference_mode():
            return encode_in_length_batches(
                tokens, texts, cuts_context(self.model), batch_size,
                lambda batch: encode_tokens(self.model, batch.to(self.device)))


def cuts_context(model: torch.nn.Module) -> bool:
    """Whether the text tower may run on a context cut after end-of-text: open_clip's causal CLIP
    pooled at the end-of-text token (argmax); not SigLIP-style towers without a causal mask."""
    return (type(model) is open_clip.CLIP and getattr(model, "text_pool_type", None) == "argmax"
            and getattr(model, "attn_mask", None) is not None)


def encode_tokens(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's CLIP.encode_text for a context cut to tokens.shape[1] positions: (N, L) -> (N, D).

    Written with the length read from the tensor, so a traced copy (the OpenVINO export) keeps the
    sequence length dynamic.
    """
    if not cuts_context(model):
        return model.encode_text(tokens)
    length = tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)  # (N, L, width)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.transformer(x, attn_mask=model.attn_mask[:length, :length])
    x = model.ln_final(x)
    x = text_global_pool(x, tokens, "argmax")  # (N, width)
    if isinstance(model.text_projection, torch.nn.Linear):
        return model.text_projection(x)
    return x @ model.text_projection


def load_torch_engine(spec: ModelSpec, device_setting: str = "auto", precision_setting: str = "auto",
                      ) -> TorchEngine:
    """Build the model on its device in its precision. Never returns a randomly initialised model.

    On the CPU, bf16 applies to the image tower only: it is what runs per request, while label
    text features (computed once and cached) keep full precision.
    """
    device = resolve_device(device_setting)
    precision = resolve_precision(precision_setting, device)
    log.info("Loading CLIP_MODEL=%s (%s weights) on %s in %s", spec.name, spec.weights_source, device,
             precision)
    model, preprocess, tokenizer = create_open_clip_model(
        spec, device, "fp32" if device.type == "cpu" else precision)
    if device.type == "cpu" and precision == "bf16":
        model.visual.to(torch.bfloat16)
    return TorchEngine(model, preprocess, tokenizer, spec, device)


def create_open_clip_model(spec: ModelSpec, device: torch.device, precision: str = "fp32"):
    """open_clip's (model, eval transform, tokenizer) for `spec`; ModelLoadError when weights are missing."""
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            spec.open_clip_name, pretrained=spec.pretrained, device=device, precision=precision,
            require_pretrained=True,
        )
        tokenizer = open_clip.get_tokenizer(spec.open_clip_name)
    except ModelLoadError:
        raise
    except Exception as error:
        raise weights_error(f"CLIP_MODEL={spec.name}", error) from error
    return model.eval(), preprocess, tokenizer
