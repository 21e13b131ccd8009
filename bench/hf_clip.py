"""An open_clip `local-dir:` CLIP written again in the Hugging Face `CLIPModel` layout, same weights.

bench/peers.py serves one set of random weights from this service (open_clip's layout) and from
infinity (which loads `transformers.CLIPModel` folders). Only plain CLIP towers convert: a ViT image
tower pooled at the class token, a causal text tower pooled at the end-of-text token, LayerNorm's
default eps (1e-5) on both sides. The conversion needs torch and safetensors only, so it runs in the
project's venv; bench/hf_check.py, run in infinity's venv, loads the result with transformers and
computes the features bench/peers.py compares with open_clip's before anything is timed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LAYER_NAMES = {  # open_clip's residual block -> transformers' CLIPEncoderLayer
    "ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
    "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
}


def _check_plain(model_cfg: dict) -> None:
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    unsupported = [key for key in ("timm_model_name", "hf_model_name", "attentional_pool", "no_ln_pre",
                                   "final_ln_after_pool", "pool_type", "no_causal_mask", "proj_bias",
                                   "norm_kwargs", "act_kwargs")
                   if vision.get(key) or text.get(key)]
    if model_cfg.get("custom_text") or "multimodal_cfg" in model_cfg or unsupported \
            or isinstance(vision.get("layers"), (list, tuple)):
        what = ", ".join(unsupported) or "a custom or multimodal tower"
        raise ValueError(f"only plain ViT CLIPs convert to CLIPModel; this one has {what}")


def hf_config(model_cfg: dict) -> dict:
    """config.json of the CLIPModel with open_clip's `model_cfg` (open_clip's defaults filled in)."""
    _check_plain(model_cfg)
    vision, text = model_cfg["vision_cfg"], model_cfg["text_cfg"]
    act = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    vision_width, text_width = vision["width"], text["width"]
    return {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": model_cfg["embed_dim"],
        "logit_scale_init_value": 2.6592, "torch_dtype": "float32",
        "vision_config": {
            "model_type": "clip_vision_model", "hidden_size": vision_width,
            "intermediate_size": int(vision_width * vision.get("mlp_ratio", 4.0)),
            "num_hidden_layers": vision["layers"],
            "num_attention_heads": vision_width // vision.get("head_width", 64),
            "image_size": vision["image_size"], "patch_size": vision["patch_size"], "num_channels": 3,
            "hidden_act": act, "layer_norm_eps": 1e-5, "projection_dim": model_cfg["embed_dim"],
        },
        "text_config": {
            "model_type": "clip_text_model", "hidden_size": text_width,
            "intermediate_size": int(text_width * text.get("mlp_ratio", 4.0)),
            "num_hidden_layers": text["layers"], "num_attention_heads": text["heads"],
            "vocab_size": text["vocab_size"], "max_position_embeddings": text["context_length"],
            "hidden_act": act, "layer_norm_eps": 1e-5, "projection_dim": model_cfg["embed_dim"],
            # pooled at the first end-of-text token; open_clip pools at the largest id, the same token
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1,
        },
    }


def _encoder(state: dict, source: str, target: str, layers: int) -> dict:
    """One tower's residual blocks; open_clip packs q, k and v in one in_proj (rows q, then k, then v)."""
    out = {}
    for index in range(layers):
        block, layer = f"{source}.resblocks.{index}.", f"{target}.layers.{index}."
        for kind in ("weight", "bias"):
            q, k, v = state[f"{block}attn.in_proj_{kind}"].chunk(3, dim=0)
            out.update({f"{layer}self_attn.q_proj.{kind}": q, f"{layer}self_attn.k_proj.{kind}": k,
                        f"{layer}self_attn.v_proj.{kind}": v})
            for ours, theirs in LAYER_NAMES.items():
                out[f"{layer}{theirs}.{kind}"] = state[f"{block}{ours}.{kind}"]
    return out


def to_hf_state(state: dict[str, torch.Tensor], model_cfg: dict) -> dict[str, torch.Tensor]:
    """open_clip CLIP state dict -> CLIPModel state dict (the same tensors, renamed, split, transposed)."""
    _check_plain(model_cfg)
    hf = {
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],  # transformers' spelling
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].t(),  # open_clip: x @ proj; Linear: x @ W.T
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].t(),
        "logit_scale": state["logit_scale"],
    }
    hf |= _encoder(state, "visual.transformer", "vision_model.encoder", model_cfg["vision_cfg"]["layers"])
    hf |= _encoder(state, "transformer", "text_model.encoder", model_cfg["text_cfg"]["layers"])
    return {name: tensor.contiguous() for name, tensor in hf.items()}


def tokenizer_files() -> dict[str, str]:
    """vocab.json and merges.txt of CLIP's BPE (open_clip's own, shipped in its wheel), and the configs
    transformers' CLIPTokenizer reads; <|startoftext|> and <|endoftext|> are open_clip's 49406, 49407."""
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(token, token): index for token, index in tokenizer.encoder.items()}
    merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "#version: 0.2\n" + "".join(f"{first} {second}\n" for first, second in merges),
        "special_tokens_map.json": json.dumps(special),
        "tokenizer_config.json": json.dumps({**special, "tokenizer_class": "CLIPTokenizer",
                                             "model_max_length": 77, "processor_class": "CLIPProcessor"}),
    }


def preprocessor_config(preprocess_cfg: dict) -> dict:
    """CLIPImageProcessor's settings for open_clip's: shortest side to `size` (bicubic), centre crop."""
    if preprocess_cfg.get("resize_mode", "shortest") != "shortest" \
            or preprocess_cfg.get("interpolation", "bicubic") != "bicubic":
        raise ValueError(f"only bicubic shortest-side resizing converts; got {preprocess_cfg}")
    size = preprocess_cfg["size"]
    size = size[0] if isinstance(size, (list, tuple)) else size
    return {
        "image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor",
        "do_resize": True, "size": {"shortest_edge": size}, "resample": 3,  # PIL's BICUBIC
        "do_center_crop": True, "crop_size": {"height": size, "width": size},
        "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(preprocess_cfg["mean"]), "image_std": list(preprocess_cfg["std"]),
        "do_convert_rgb": True,
    }


def write_hf_clip(local_dir: Path, folder: Path) -> Path:
    """The open_clip `local-dir:` model in `local_dir` as a CLIPModel folder in `folder`."""
    local_dir, folder = Path(local_dir), Path(folder)
    config = json.loads((local_dir / "open_clip_config.json").read_text())
    state = load_file(str(local_dir / "open_clip_model.safetensors"))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(to_hf_state(state, config["model_cfg"]), str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config(config["model_cfg"]), indent=1))
    (folder / "preprocessor_config.json").write_text(
        json.dumps(preprocessor_config(config["preprocess_cfg"]), indent=1))
    for name, text in tokenizer_files().items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder
