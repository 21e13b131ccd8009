"""Texts that start alike, encoded once up to where they part: a prompt template's "<start> a photo of a".

CLIP's text tower is causal: a position's state in every layer depends only on the positions before
it. Every label under one template shares the template's first tokens, so their states are the same
for all labels; only the label's own tokens and what follows need the whole tower. For the shipped
vocabulary that is about half of all tokens (8 templates x 2,049 labels: 76k of 147k tokens).

`encode_after_prefix` takes the shared positions' per-layer inputs instead of their tokens. Each layer's
queries are the new positions, its keys and values the shared ones followed by the new ones, under
the causal mask's rows for those positions. Written with lengths read from the tensors, so a traced
copy (the OpenVINO export) keeps the batch, the shared length and the new length dynamic.
"""

from __future__ import annotations

import torch


def encode_after_prefix(model: torch.nn.Module, tokens: torch.Tensor, states: torch.Tensor,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, S) tokens after a shared prefix whose per-layer inputs are `states` (layers, P, width) ->

    (N, D) unit features, pooled at each text's end-of-text token (which must be among the S), and
    (layers, S, width) the per-layer inputs of the first text's S positions, to extend a prefix.
    """
    shared, length = states.shape[1], tokens.shape[1]
    cast_dtype = model.transformer.get_cast_dtype()
    x = model.token_embedding(tokens).to(cast_dtype)  # (N, S, width)
    x = x + model.positional_embedding[shared:shared + length].to(cast_dtype)
    mask = model.attn_mask[shared:shared + length, :shared + length].to(cast_dtype)  # (S, P + S)
    inputs = []
    for index, block in enumerate(model.transformer.resblocks):
        inputs.append(x[0])
        prefix = states[index].to(cast_dtype).unsqueeze(0).expand(x.shape[0], -1, -1)  # (N, P, width)
        keys = block.ln_1(torch.cat([prefix, x], dim=1))  # (N, P + S, width)
        attended = block.attn(keys[:, shared:], keys, keys, need_weights=False, attn_mask=mask)[0]
        x = x + block.ls_1(attended)
        x = x + block.ls_2(block.mlp(block.ln_2(x)))
    x = model.ln_final(x)
    pooled = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]  # end-of-text has the highest id
    if isinstance(model.text_projection, torch.nn.Linear):
        features = model.text_projection(pooled)
    else:
        features = pooled @ model.text_projection
    return torch.nn.functional.normalize(features, dim=-1), torch.stack(inputs)


def start_states(model: torch.nn.Module, start_token: int) -> torch.Tensor:
    """(layers, 1, width): the per-layer inputs of the start-of-text token, which every text shares."""
    layers = len(model.transformer.resblocks)
    width = model.positional_embedding.shape[1]
    empty = torch.zeros(layers, 0, width, dtype=model.positional_embedding.dtype)
    with torch.no_grad():
        _, states = encode_after_prefix(model, torch.tensor([[start_token]]), empty)
    return states


def shared_prefix_length(tokens: torch.Tensor, lengths: torch.Tensor) -> int:
    """Leading positions that all rows of (N, context) `tokens` share, leaving each row at least its
    end-of-text token; 1 (the start token) for a single text."""
    if tokens.shape[0] < 2:
        return 1
    differs = (tokens != tokens[:1]).any(dim=0)  # (context,)
    first_difference = int(differs.nonzero()[0]) if bool(differs.any()) else tokens.shape[1]
    return max(1, min(first_difference, int(lengths.min()) - 1))
