"""The open_clip model's two towers converted to OpenVINO once, and kept on disk between starts.

Converting traces the torch model (tens of seconds for ViT-B/32); a start that finds a matching export
only reads it. An export is keyed like the label-feature cache: the model's identity, the OpenVINO
version, the weights' precision (f32, int8 weights, or int8 weights and image activations, with the
quantisation's recipe: openvino_quantize) and the towers' input layout, so a changed
model or library converts again. Each file's checksum is in the manifest; a corrupt or partial export
is rebuilt, never used. Exports are written to a temporary folder and renamed into place, and workers
that start together wait on a lock instead of converting twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch

from clip_service.engines.openvino_import import ov
from clip_service.engines.openvino_quantize import INT8_ACTIVATIONS, quantize_image_tower, recipe_key
from clip_service.engines.spec import ModelSpec, model_identity
from clip_service.engines.text_prefix import encode_after_prefix, start_states
from clip_service.engines.torch_engine import create_open_clip_model, cuts_context, encode_tokens

try:
    import fcntl
except ImportError:  # Windows: conversions are not excluded from each other (see _locked)
    fcntl = None

log = logging.getLogger(__name__)

EXPORT_FORMAT = "clip-service-openvino-v2"
# What the exported towers take, part of the key: uint8 pixels normalised inside the graph; int64
# tokens after a shared prefix given as per-layer states (text_prefix), or the full context for towers
# that cannot be cut; unit features out.
INPUT_LAYOUT = "image:u8[N,3,H,W]->unit;text:i64[N,S]+f32[layers,P,width]->unit,f32[layers,S,width]"
START_STATES = "text-start.npy"  # the start-of-text token's per-layer inputs, where the text is cut
WEIGHT_FORMATS = ("f32", "int8", INT8_ACTIVATIONS)  # the last: image activations too
TOWERS = ("image", "text")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ExportedTowers:
    """An export on disk and what an engine needs besides it, so a warm start never loads torch weights."""

    folder: Path
    weights: str  # one of WEIGHT_FORMATS
    preprocess: dict  # open_clip's preprocess config (size, mean, std, interpolation, resize_mode)
    logit_scale: float
    logit_bias: float | None
    cuts_context: bool  # the text tower takes tokens cut after end-of-text, after a shared prefix
    context_length: int

    def model_path(self, tower: str) -> Path:
        return self.folder / f"{tower}.xml"


def export_key(identity: str, weights: str) -> str:
    digest = hashlib.sha256()
    parts = (EXPORT_FORMAT, identity, ov.get_version(), weights, INPUT_LAYOUT)
    for part in parts + ((recipe_key(),) if weights == INT8_ACTIVATIONS else ()):
        digest.update(part.encode("utf-8"))
        digest.update(b"\x00")
    return digest.hexdigest()


def cached_towers(spec: ModelSpec, weights: str, cache_dir: Path) -> ExportedTowers:
    """The export of `spec` with `weights` under cache_dir/openvino: read, or converted and written."""
    key = export_key(model_identity(spec), weights)
    root = Path(cache_dir) / "openvino"
    folder = root / key[:32]
    exported = read_export(folder, key)
    if exported is not None:
        return exported
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f".{key[:32]}.lock"):
        exported = read_export(folder, key, report=False)  # another worker may have converted it
        if exported is None:
            started = time.perf_counter()
            log.info("Converting CLIP_MODEL=%s to OpenVINO (%s weights), once; kept in %s", spec.name,
                     weights, folder)
            exported = _publish(root, folder, key, lambda work: convert(spec, weights, work))
            log.info("Converted to OpenVINO in %.1f s", time.perf_counter() - started)
    return exported


def read_export(folder: Path, key: str, report: bool = True) -> ExportedTowers | None:
    """The export in `folder` if its manifest has `key` and every file its checksum; else None
    (with a warning, if `report`, when something is there but unusable)."""
    manifest_path = folder / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if manifest.get("key") != key or set(files) != _file_names(manifest["cuts_context"]):
            raise ValueError("the manifest does not match this model and OpenVINO version")
        for name, checksum in files.items():
            if _file_sha256(folder / name) != checksum:
                raise ValueError(f"{name} does not match its checksum")
        return ExportedTowers(folder, manifest["weights"], manifest["preprocess"], manifest["logit_scale"],
                              manifest["logit_bias"], manifest["cuts_context"], manifest["context_length"])
    except FileNotFoundError:
        if report and folder.exists():
            log.warning("OpenVINO export %s is incomplete; converting again", folder)
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        if report:
            log.warning("OpenVINO export %s is unusable (%s); converting again", folder, error)
        return None


def convert(spec: ModelSpec, weights: str, folder: Path) -> dict:
    """Trace both towers of the fp32 torch model into `folder`; returns the manifest's model fields."""
    model, _, tokenizer = create_open_clip_model(spec, torch.device("cpu"), "fp32")
    preprocess = open_clip.get_model_preprocess_cfg(model)
    height, width = (preprocess["size"],) * 2 if isinstance(preprocess["size"], int) else preprocess["size"]
    cut = cuts_context(model)
    context = int(tokenizer.context_length)
    sample_tokens = tokenizer(["a photo of a cat.", "itap of a dog."])
    if cut:
        sample_tokens = sample_tokens[:, :int(sample_tokens.argmax(dim=-1).max()) + 1]
    image = (ImageTower(model, preprocess["mean"], preprocess["std"]),
             torch.zeros(1, 3, height, width, dtype=torch.uint8), [([-1, 3, height, width], ov.Type.u8)])
    if cut:
        start = start_states(model, int(sample_tokens[0, 0]))  # (layers, 1, width)
        np.save(folder / START_STATES, start.numpy())
        layers, width_ = start.shape[0], start.shape[2]
        text = (PrefixedTextTower(model), (sample_tokens[:, 1:], start),
                [([-1, -1], ov.Type.i64), ([layers, -1, width_], ov.Type.f32)])
    else:
        text = (TextTower(model), sample_tokens, [([-1, context], ov.Type.i64)])
    towers = {"image": image, "text": text}
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # tracing warns that shape checks inside torch's attention become constants: they are checks
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.trace's deprecation, from OpenVINO
        for tower, (module, example, shape) in towers.items():
            converted = ov.convert_model(module, example_input=example, input=shape)
            if weights == INT8_ACTIVATIONS and tower == "image":
                converted = quantize_image_tower(converted, height, width)
            elif weights in ("int8", INT8_ACTIVATIONS):
                compress_weights_int8(converted)
            ov.save_model(converted, folder / f"{tower}.xml", compress_to_fp16=False)
    with torch.inference_mode():
        bias = getattr(model, "logit_bias", None)
        return {"weights": weights,
                "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in preprocess.items()},
                "logit_scale": float(model.logit_scale.exp()),
                "logit_bias": float(bias) if bias is not None else None,
                "cuts_context": cut, "context_length": context}


class ImageTower(torch.nn.Module):
    """uint8 (N, 3, H, W) pixels -> (N, D) unit features: normalisation and the tower in one graph."""

    def __init__(self, model: torch.nn.Module, mean, std):
        super().__init__()
        self.model = model
        # (1, 3, 1, 1), scaled to 0..255 so the uint8 input needs no division first
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.model.encode_image((pixels.float() - self.mean) / self.std)
        return torch.nn.functional.normalize(features, dim=-1)


class PrefixedTextTower(torch.nn.Module):
    """int64 (N, S) tokens after a shared prefix, and its (layers, P, width) per-layer inputs ->
    (N, D) unit features and the first text's (layers, S, width) per-layer inputs (text_prefix)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return encode_after_prefix(self.model, tokens, states)


class TextTower(torch.nn.Module):
    """int64 (N, context) tokens -> (N, D) unit features: for towers that cannot be cut (SigLIP's)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(encode_tokens(self.model, tokens), dim=-1)


def compress_weights_int8(model: ov.Model) -> int:
    """Store the weights of every fully connected layer and of the token embedding as int8.

    No calibration data: weights are rounded symmetrically with one scale per output channel (per row
    of the embedding); activations stay float. The graph gets OpenVINO's compressed-weight pattern
    (int8 constant -> Convert -> Multiply by the scales), which its CPU plugin runs as int8 matrix
    products, quantising activations on the fly. Returns how many layers were compressed.
    """
    compressed = 0
    for node in model.get_ordered_ops():
        kind = node.get_type_name()
        if kind == "MatMul":
            port = 1
            # transpose_b: weights are (out, in), as torch's Linear keeps them; one scale per output
            reduce_axis = 1 if node.get_attributes()["transpose_b"] else 0
        elif kind == "Gather":
            port, reduce_axis = 0, 1  # (vocabulary, width) table: one scale per token's row
        else:
            continue
        source = node.input_value(port).get_node()
        if source.get_type_name() != "Constant" or source.get_element_type() != ov.Type.f32:
            continue
        weights = source.get_data()
        if weights.ndim != 2 or weights.size < 1024:  # indices, shapes and tiny tables stay as they are
            continue
        node.input(port).replace_source_output(_int8_weights(weights, reduce_axis))
        compressed += 1
    return compressed


def _int8_weights(weights: np.ndarray, reduce_axis: int) -> ov.Output:
    """A 2-D float32 array -> a graph output that restores it from int8 values and float32 scales."""
    from openvino import opset13  # openvino itself is imported already (openvino_import)

    scale = np.abs(weights).max(axis=reduce_axis, keepdims=True) / 127.0
    scale[scale == 0] = 1.0
    quantised = np.clip(np.rint(weights / scale), -127, 127).astype(np.int8)
    restored = opset13.multiply(opset13.convert(opset13.constant(quantised), ov.Type.f32),
                                opset13.constant(scale.astype(np.float32)))
    return restored.output(0)


def _publish(root: Path, folder: Path, key: str, write) -> ExportedTowers:
    """Run write(work folder) -> manifest fields, then checksum, and rename the whole folder into place."""
    work = Path(tempfile.mkdtemp(dir=root, prefix=".converting-"))
    try:
        fields = write(work)
        files = {name: _file_sha256(work / name) for name in sorted(_file_names(fields["cuts_context"]))}
        manifest = {"format": EXPORT_FORMAT, "key": key, "openvino": ov.get_version(), "files": files,
                    **fields}
        (work / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if folder.exists():
            shutil.rmtree(folder)  # unusable (read_export said so), and we hold the lock
        os.replace(work, folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    exported = read_export(folder, key)
    if exported is None:
        raise RuntimeError(f"the OpenVINO export just written to {folder} cannot be read back")
    return exported


def _file_names(cuts_context: bool) -> set[str]:
    names = {f"{tower}.{ext}" for tower in TOWERS for ext in ("xml", "bin")}
    return names | {START_STATES} if cuts_context else names


def _file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One conversion at a time for this cache folder; without fcntl (Windows) none is excluded, and each
    conversion still lands whole (it is written aside and renamed)."""
    if fcntl is None:
        yield
        return
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
