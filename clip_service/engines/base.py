"""The Engine protocol: what the rest of the service may ask of a loaded model, whatever runs it.

Features are unit-length float32 torch tensors on the CPU (the label cache and scoring work on them); an
engine on another runtime converts its outputs to that. Nothing else of an engine's runtime leaks out:
its device is described by two strings, and running out of memory is EngineOutOfMemory.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch
    from PIL import Image


class ModelLoadError(RuntimeError):
    """The model, its weights or its device could not be had; the message says what to do."""


class EngineOutOfMemory(RuntimeError):
    """The engine's device ran out of memory on a batch; engines raise it in place of their own type.

    The engine has already released what memory it could, so a smaller batch may succeed.
    """


class TextEncoder(Protocol):
    """The part of an engine that label features need."""

    identity: str  # changes whenever the text features may change: model, weights, precision

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """N texts -> (N, D) unit float32 features on the CPU."""
        ...


class Engine(TextEncoder, Protocol):
    """One loaded CLIP model."""

    name: str  # CLIP_MODEL as the operator wrote it
    weights_source: str  # whose weights: "OpenAI" or "OpenCLIP" (the JSON key "framework")
    backend: str  # what runs the model: "torch" or "openvino"
    precision: str  # what the image tower computes in: "fp32", "fp16", "bf16" or "int8" (int8 weights)
    device_name: str  # where it runs, as shown in /health, e.g. "cpu" or "cuda:0"
    device_kind: str  # "cpu", "cuda" or "mps": the kind of device, for choices such as batch sizes
    input_size: tuple[int, int]  # (H, W) of the image tower's input
    logit_scale: float
    logit_bias: float | None  # None: softmax scoring (CLIP); a number: sigmoid scoring (SigLIP)

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """An RGB image -> one model input, (3, H, W); runs on the request's thread."""
        ...

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) inputs from `prepare` -> (N, D) unit float32 features on the CPU.

        Raises EngineOutOfMemory when the device runs out of memory.
        """
        ...
