"""The Encoder: a loaded engine with what runs beside it, under both classification and embeddings.

It holds the one way images reach the model (the micro-batcher's submit_many in the server, the engine
itself in the command-line tools), the step that makes a decoded image the model's input, and the
caches of request texts: `labels=` and /embed's texts with prompts (through the prompt templates),
and /embed's plain texts (as written). Classifier and Embedder each hold it; neither holds the other.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image

from clip_service.engines.base import Engine
from clip_service.vocabulary.custom_labels import CustomLabelCache

ImageEncoder = Callable[[torch.Tensor, float | None], torch.Tensor]  # ((N, 3, H, W), deadline) -> (N, D)


def direct_encoder(engine: Engine) -> ImageEncoder:
    """Encode the images in the calling thread (no batching; deadlines are not enforced)."""
    return lambda pixels, deadline=None: engine.encode_images(pixels)


class Encoder:
    """Model inputs and texts -> unit features, with the engine's image path and text caches."""

    def __init__(self, engine: Engine, encode_images: ImageEncoder | None = None,
                 label_texts: CustomLabelCache | None = None, plain_texts: CustomLabelCache | None = None):
        self.engine = engine
        self.encode_images = direct_encoder(engine) if encode_images is None else encode_images
        self.label_texts = CustomLabelCache(engine) if label_texts is None else label_texts
        self.plain_texts = CustomLabelCache(engine) if plain_texts is None else plain_texts

    def prepare(self, image: Image.Image) -> torch.Tensor:
        """An RGB image -> the (3, H, W) model input; run on the thread that decoded it."""
        return self.engine.prepare(image)

    def images(self, inputs: list[torch.Tensor], deadline: float | None = None) -> torch.Tensor:
        """(N, D) unit features of model inputs from `prepare`, in one forward pass."""
        return self.encode_images(torch.stack(inputs), deadline)  # (N, 3, H, W) in
