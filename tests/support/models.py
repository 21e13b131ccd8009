"""A tiny, seeded, randomly initialised CLIP in open_clip's `local-dir:` layout, and the engine on it.

Tests and the default benchmark run the real loading code on it; only the weights are small. It
recognises nothing: use it for plumbing, never for accuracy (trained_clip.py knows colours).

    .venv/bin/python -m tests.support.models OUT_DIR     # write the tiny model into OUT_DIR
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from clip_service.engines.base import Engine
from clip_service.engines.registry import load_engine
from clip_service.engines.spec import parse_model_spec

TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_PREPROCESS = {
    "size": 64,
    "mode": "RGB",
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
    "interpolation": "bicubic",
    "resize_mode": "shortest",
}


# SigLIP's shape, small: a timm ViT image tower with attention-pool, a text tower without causal mask
# pooled at the last token, a learned logit bias (sigmoid scoring), and squash resizing.
TINY_SIGLIP_CONFIG = {
    "embed_dim": 192,
    "init_logit_bias": -10,
    "custom_text": True,
    "vision_cfg": {"image_size": 224, "timm_model_name": "vit_tiny_patch16_224",
                   "timm_model_pretrained": False, "timm_pool": "map", "timm_proj": "none"},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1,
                 "no_causal_mask": True, "proj_bias": True, "pool_type": "last",
                 "norm_kwargs": {"eps": 1e-6}},
}
SIGLIP_PREPROCESS = {"size": 224, "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                     "resize_mode": "squash"}


def write_tiny_clip(folder: Path, seed: int = 0, model_cfg: dict | None = None,
                    preprocess_cfg: dict | None = None) -> Path:
    """Write open_clip_config.json + open_clip_model.safetensors into folder and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model_cfg = model_cfg or TINY_CONFIG
    torch.manual_seed(seed)
    arguments = {key: value for key, value in model_cfg.items() if key != "custom_text"}
    model = (open_clip.CustomTextCLIP if model_cfg.get("custom_text") else open_clip.CLIP)(**arguments)
    preprocess = preprocess_cfg or dict(TINY_PREPROCESS, size=model_cfg["vision_cfg"]["image_size"])
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}, indent=1))
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


def load_tiny_engine(model_dir: Path) -> Engine:
    """The real torch engine on a model folder written by write_tiny_clip, on the CPU."""
    return load_engine(parse_model_spec(f"local-dir:{model_dir}"), "cpu")


if __name__ == "__main__":
    import sys

    print(write_tiny_clip(Path(sys.argv[1])))
