"""bench/hf_clip.py: open_clip's weights in transformers' CLIPModel layout, on the tiny model.

transformers is not a dependency of the project (it lives in bench.peers' infinity venv, where
bench/hf_check.py compares the two models' features before each benchmark run); here the conversion
is checked without it: the names are the ones transformers 4.57.6's CLIPModel has for one-layer towers,
every tensor is carried over, and the split attention computes what open_clip's packed
nn.MultiheadAttention computes.
"""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from safetensors.torch import load_file

from bench.hf_clip import hf_config, to_hf_state, write_hf_clip
from tests.support.models import TINY_CONFIG, TINY_SIGLIP_CONFIG, write_tiny_clip

LAYER = ("layer_norm1.bias", "layer_norm1.weight", "layer_norm2.bias", "layer_norm2.weight",
         "mlp.fc1.bias", "mlp.fc1.weight", "mlp.fc2.bias", "mlp.fc2.weight", "self_attn.k_proj.bias",
         "self_attn.k_proj.weight", "self_attn.out_proj.bias", "self_attn.out_proj.weight",
         "self_attn.q_proj.bias", "self_attn.q_proj.weight", "self_attn.v_proj.bias",
         "self_attn.v_proj.weight")
# CLIPModel(CLIPConfig(...)).state_dict() of transformers 4.57.6 for one layer per tower (46 names)
CLIPMODEL_NAMES = {
    "logit_scale", "text_projection.weight", "visual_projection.weight",
    "text_model.embeddings.position_embedding.weight", "text_model.embeddings.token_embedding.weight",
    "text_model.final_layer_norm.bias", "text_model.final_layer_norm.weight",
    "vision_model.embeddings.class_embedding", "vision_model.embeddings.patch_embedding.weight",
    "vision_model.embeddings.position_embedding.weight", "vision_model.post_layernorm.bias",
    "vision_model.post_layernorm.weight", "vision_model.pre_layrnorm.bias",
    "vision_model.pre_layrnorm.weight",
    *(f"{tower}.encoder.layers.0.{name}" for tower in ("text_model", "vision_model") for name in LAYER),
}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = write_tiny_clip(tmp_path_factory.mktemp("tiny"))
    return folder, load_file(str(folder / "open_clip_model.safetensors"))


def test_every_tensor_lands_under_clipmodel_names(tiny):
    _, state = tiny
    hf = to_hf_state(state, TINY_CONFIG)
    assert set(hf) == CLIPMODEL_NAMES
    assert sum(t.numel() for t in hf.values()) == sum(t.numel() for t in state.values())
    assert torch.equal(hf["visual_projection.weight"], state["visual.proj"].t())
    assert torch.equal(hf["vision_model.embeddings.patch_embedding.weight"], state["visual.conv1.weight"])


def test_split_attention_computes_open_clips_attention(tiny):
    """q, k and v taken out of open_clip's packed in_proj, run as transformers' CLIPAttention does
    (separate projections, heads of width/heads, softmax(q k^T / sqrt(d)) v, out_proj)."""
    _, state = tiny
    model = open_clip.CLIP(**TINY_CONFIG)
    model.load_state_dict(state)
    attention = model.visual.transformer.resblocks[0].attn  # nn.MultiheadAttention, batch first
    hf = to_hf_state(state, TINY_CONFIG)
    heads = hf_config(TINY_CONFIG)["vision_config"]["num_attention_heads"]
    layer = "vision_model.encoder.layers.0.self_attn."

    def project(x, name):  # (N, L, W) -> (N, heads, L, W / heads)
        y = torch.nn.functional.linear(x, hf[f"{layer}{name}.weight"], hf[f"{layer}{name}.bias"])
        return y.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2)

    torch.manual_seed(1)
    x = torch.randn(2, 5, TINY_CONFIG["vision_cfg"]["width"])
    with torch.no_grad():
        expected = attention(x, x, x, need_weights=False)[0]
        mixed = torch.nn.functional.scaled_dot_product_attention(
            project(x, "q_proj"), project(x, "k_proj"), project(x, "v_proj"))
        got = torch.nn.functional.linear(mixed.transpose(1, 2).reshape(x.shape),
                                         hf[f"{layer}out_proj.weight"], hf[f"{layer}out_proj.bias"])
    assert heads == 2
    assert torch.allclose(got, expected, atol=1e-5)


def test_written_folder_has_the_model_the_tokenizer_and_the_preprocessing(tiny, tmp_path):
    folder, state = tiny
    hf = write_hf_clip(folder, tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text())
    assert config["vision_config"]["hidden_act"] == "gelu"  # open_clip's ViT-B-32 is not quick_gelu
    assert config["text_config"]["max_position_embeddings"] == 77
    assert set(load_file(str(hf / "model.safetensors"))) == CLIPMODEL_NAMES
    vocab = json.loads((hf / "vocab.json").read_text())
    assert len(vocab) == 49408 and vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    merges = (hf / "merges.txt").read_text().splitlines()
    assert merges[0] == "#version: 0.2" and merges[1] == "i n"
    preprocessing = json.loads((hf / "preprocessor_config.json").read_text())
    assert preprocessing["size"] == {"shortest_edge": 64} and preprocessing["resample"] == 3


def test_only_plain_clips_convert():
    with pytest.raises(ValueError, match="only plain ViT CLIPs"):
        hf_config(TINY_SIGLIP_CONFIG)
