"""Math shared by the models: positional encoding, attention with a cache, one transformer layer step.

The cached path does its own attention with the parameters of torch's modules (`nn.MultiheadAttention`'s
`in_proj_weight`/`in_proj_bias`/`out_proj`, the layers' norms and feed-forward), because torch's layers
take no cache. The whole-sequence `forward` of each model runs torch's own modules, so the test
"cached step == full forward" compares two independent computations.

All tensors here are batch-first: [batch, seq, d_model], heads as [batch, heads, seq, head_dim].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

POSITIONAL_ENCODINGS = ("sinusoidal", "none")
# The special tokens an encoder-decoder's checkpoint names (s2s_model.json "special_tokens").
SEQ2SEQ_TOKENS = ("pad_token_id", "decoder_start_token_id", "eos_token_id")


def sinusoidal_positions(positions: torch.Tensor, d_model: int) -> torch.Tensor:
    """The fixed sin/cos encoding of "Attention Is All You Need" (sin at even, cos at odd features).

    positions: [seq] (or [batch, seq]: one row of positions per input) int64 -> [..., d_model] float32.
    Computed, not looked up, so any length works and no parameter is added (a plain checkpoint still
    loads strictly).
    """
    inv_freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model))
    angles = positions.to(torch.float32)[..., None] * inv_freq  # [..., d_model/2]
    return torch.stack((angles.sin(), angles.cos()), dim=-1).flatten(-2)


def causal_mask(size: int, device: torch.device | None = None) -> torch.Tensor:
    """[size, size] float32: 0 on and below the diagonal, -inf above (torch's square subsequent mask)."""
    return nn.Transformer.generate_square_subsequent_mask(size, device=device, dtype=torch.float32)


def key_padding_bias(attention_mask: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """attention_mask: [batch, keys] int64 (1 = real token) -> additive bias [batch, 1, 1, keys].

    The finite minimum, not -inf, keeps a row without any real key from turning into NaN.
    """
    bias = torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device)
    bias = bias.masked_fill(attention_mask == 0, torch.finfo(dtype).min)
    return bias[:, None, None, :]


def split_heads(x: torch.Tensor, nhead: int) -> torch.Tensor:
    """[batch, seq, d_model] -> [batch, nhead, seq, head_dim]."""
    batch, seq, d_model = x.shape
    return x.reshape(batch, seq, nhead, d_model // nhead).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[batch, nhead, seq, head_dim] -> [batch, seq, d_model]."""
    batch, nhead, seq, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, seq, nhead * head_dim)


def attend(mha: nn.MultiheadAttention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
           bias: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention of `mha`'s heads, before its output projection.

    query: [batch, heads, q, head_dim]; key, value: [batch, heads, k, head_dim]; bias: additive,
    broadcastable to [batch, heads, q, k]. Returns [batch, heads, q, head_dim].
    """
    # the scale from the module's int head_dim, not a traced shape: the graph keeps a plain constant
    scores = query @ key.transpose(-1, -2) / math.sqrt(mha.head_dim)
    if bias is not None:
        scores = scores + bias
    return torch.softmax(scores, dim=-1) @ value


def project(mha: nn.MultiheadAttention, x: torch.Tensor, part: int) -> torch.Tensor:
    """One of the query (0), key (1) or value (2) projections of `mha`, split into heads.

    x: [batch, seq, d_model] -> [batch, heads, seq, head_dim].
    """
    d_model = mha.embed_dim
    rows = slice(part * d_model, (part + 1) * d_model)
    return split_heads(F.linear(x, mha.in_proj_weight[rows], mha.in_proj_bias[rows]), mha.num_heads)


def self_attention(mha: nn.MultiheadAttention, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Full-sequence self-attention with `mha`'s weights. x: [batch, seq, d_model] -> same shape."""
    out = attend(mha, project(mha, x, 0), project(mha, x, 1), project(mha, x, 2), bias)
    return mha.out_proj(merge_heads(out))


def encoder_layer(layer: nn.TransformerEncoderLayer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """torch's post-norm TransformerEncoderLayer in eval mode. x: [batch, src_len, d_model]."""
    x = layer.norm1(x + self_attention(layer.self_attn, x, bias))
    return layer.norm2(x + layer.linear2(layer.activation(layer.linear1(x))))


def cross_attention_cache(layer: nn.TransformerDecoderLayer,
                          memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The cross-attention key and value of one decoder layer, computed once per input.

    memory: [batch, src_len, d_model] -> two [batch, heads, src_len, head_dim].
    """
    return project(layer.multihead_attn, memory, 1), project(layer.multihead_attn, memory, 2)


def decoder_layer_step(layer: nn.TransformerDecoderLayer, x: torch.Tensor, past_key: torch.Tensor,
                       past_value: torch.Tensor, cross_key: torch.Tensor, cross_value: torch.Tensor,
                       memory_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torch's post-norm TransformerDecoderLayer for one new position, with a self-attention cache.

    x: [batch, 1, d_model]; past_key, past_value: [batch, heads, past_len, head_dim] (past_len may be 0);
    cross_key, cross_value: [batch, heads, src_len, head_dim]; memory_bias: [batch, 1, 1, src_len].
    Returns the new x and the self-attention key/value grown to past_len + 1. The new position may
    attend to every cached one, which is what the causal mask of the full forward allows.
    """
    sa = layer.self_attn
    key = torch.cat((past_key, project(sa, x, 1)), dim=2)
    value = torch.cat((past_value, project(sa, x, 2)), dim=2)
    x = layer.norm1(x + sa.out_proj(merge_heads(attend(sa, project(sa, x, 0), key, value))))
    ca = layer.multihead_attn
    x = layer.norm2(x + ca.out_proj(merge_heads(attend(ca, project(ca, x, 0), cross_key, cross_value, memory_bias))))
    x = layer.norm3(x + layer.linear2(layer.activation(layer.linear1(x))))
    return x, key, value
