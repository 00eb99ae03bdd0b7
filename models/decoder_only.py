"""The decoder-only language models: SimpleDecoderOnly and DecoderOnly, the contrast to the encoder-decoders.

Both are an embedding, `nn.TransformerDecoder` (post-norm layers, no final norm) called with its input
as its own memory (`self.transformer(x, x)`), and a linear output. Class names, constructor arguments
and parameter names are the plain versions', so their state_dicts load with strict=True. What differs
from the plain math (see models/README.md):
- causal: position t attends (in self-attention and in the attention over the memory) to positions
  <= t only. The plain versions have no mask at all, so in training each position saw the tokens after
  it; no generation can reproduce that, one token at a time;
- `positional_encoding="sinusoidal"` (the default) adds the fixed sin/cos encoding (no parameters);
  "none" is the plain versions' order-blind math;
- padding: prompts are padded on the left, like transformers' decoder-only `generate`; padded keys are
  masked and positions count real tokens only, so a padded row computes what it computes alone.

`forward` keeps the plain call and its sequence-first layout ([seq, batch]); `full_forward` and `step`
are batch-first. The cached step takes several new positions at once: the prompt in one call, then
one token per call. Every layer caches the keys and values of its self-attention and of its attention
over the memory (the memory being the layer stack's input, it grows by one position per token too).
"""

from __future__ import annotations

import torch
from torch import nn

from models.layers import attend, causal_mask, merge_heads, project, sinusoidal_positions
from models.transformer import check_dims
from runtime.manifest import DECODER_ONLY, StateTensor

# The special tokens a decoder-only checkpoint names: no decoder start token, the prompt starts generation.
LM_TOKENS = ("pad_token_id", "eos_token_id")
_PARTS = ("self", "memory")  # the two attentions of a layer, as the states name them


class TransformerLM(nn.Module):
    """What the two decoder-only models share. A subclass builds `embedding`, `transformer` (an
    nn.TransformerDecoder) and `fc_out`, and sets `d_model`, `nhead` and `positional_encoding`."""

    kind = DECODER_ONLY  # the export directory's kind (runtime/manifest.py)
    special_tokens = LM_TOKENS

    d_model: int
    nhead: int
    positional_encoding: str
    embedding: nn.Embedding
    transformer: nn.TransformerDecoder
    fc_out: nn.Linear

    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids, positions: [batch, seq] int64 -> [batch, seq, d_model]."""
        x = self.embedding(ids)
        if self.positional_encoding == "sinusoidal":
            x = x + sinusoidal_positions(positions, self.d_model)
        return x

    # -- whole sequences, torch's modules ---------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The plain call: x [seq, batch] int64, sequence-first, no padding. Returns logits [seq, batch, vocab]."""
        positions = torch.arange(x.shape[0], device=x.device).expand(x.shape[1], -1)  # [batch, seq]
        embedded = self.embed(x.T, positions).transpose(0, 1)
        mask = causal_mask(x.shape[0], x.device)
        return self.fc_out(self.transformer(embedded, embedded, tgt_mask=mask, memory_mask=mask))

    def full_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits of every position, batch-first. input_ids, attention_mask: [batch, seq] int64 (mask 1 =
        token, padding on the left). Returns [batch, seq, vocab]; rows at padded positions are meaningless."""
        embedded = self.embed(input_ids, positions_of(attention_mask)).transpose(0, 1)  # [seq, batch, d_model]
        mask = causal_mask(input_ids.shape[1], input_ids.device)
        # finite, not -inf: a padded query whose keys are all padding must not turn into NaN
        padding = torch.zeros(attention_mask.shape, device=input_ids.device).masked_fill(
            attention_mask == 0, torch.finfo(torch.float32).min)
        output = self.transformer(embedded, embedded, tgt_mask=mask, memory_mask=mask,
                                  tgt_key_padding_mask=padding, memory_key_padding_mask=padding)
        return self.fc_out(output).transpose(0, 1)

    # -- the cached path -----------------------------------------------------------------------------
    def state_specs(self) -> tuple[StateTensor, ...]:
        """Per layer, the keys and values of its self-attention and of its attention over the memory:
        [batch, heads, seq, head_dim], empty before the prompt, growing with every position."""
        return tuple(StateTensor(f"past_key_values.{i}.{part}.{kv}", f"present.{i}.{part}.{kv}", batch_axis=0,
                                 seq_axis=2, kind="grows", init="empty")
                     for i in range(len(self.transformer.layers)) for part in _PARTS for kv in ("key", "value"))

    def start_states(self, batch: int) -> dict[str, torch.Tensor]:
        """The empty caches of `batch` rows."""
        empty = self.embedding.weight.new_zeros(batch, self.nhead, 0, self.d_model // self.nhead)
        return {s.input_name: empty for s in self.state_specs()}

    def step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             states: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """New positions through the cache. input_ids: [rows, new_len] int64 (the prompt, or one token);
        attention_mask: [rows, past_len + new_len] int64, the whole sequence's (1 = token, padding on the
        left); states: [rows, heads, past_len, head_dim] by state input name (see `state_specs`).

        Returns logits [rows, new_len, vocab] and the states grown to past_len + new_len, by output name.
        """
        new_len = input_ids.shape[1]
        x = self.embed(input_ids, positions_of(attention_mask)[:, -new_len:])
        memory = x  # the plain call's memory is its input: the embedded tokens
        bias = _attention_bias(attention_mask, new_len)
        present = {}
        for i, layer in enumerate(self.transformer.layers):
            past = {(part, kv): states[f"past_key_values.{i}.{part}.{kv}"]
                    for part in _PARTS for kv in ("key", "value")}
            x, grown = _layer_step(layer, x, memory, past, bias)
            present.update({f"present.{i}.{part}.{kv}": value for (part, kv), value in grown.items()})
        return self.fc_out(x), present


def positions_of(attention_mask: torch.Tensor) -> torch.Tensor:
    """[batch, seq] int64 mask (left padding) -> positions [batch, seq] int64: 0 at each row's first real
    token, counting real tokens (padding gets 0), like transformers' decoder-only `generate`."""
    return (attention_mask.cumsum(dim=1) - 1).clamp(min=0)


def _attention_bias(attention_mask: torch.Tensor, new_len: int) -> torch.Tensor:
    """Additive bias [rows, 1, new_len, total] of the new positions over all keys: 0 where the key is a
    real token at or before the query, the float minimum elsewhere (finite: no NaN for padded queries).

    attention_mask: [rows, total] int64, total = past_len + new_len.
    """
    total = attention_mask.shape[1]
    queries = torch.arange(total - new_len, total, device=attention_mask.device)  # absolute positions
    keys = torch.arange(total, device=attention_mask.device)
    allowed = (keys[None, :] <= queries[:, None])[None, None] & (attention_mask[:, None, None, :] != 0)
    return torch.where(allowed, torch.tensor(0.0), torch.tensor(torch.finfo(torch.float32).min))


def _layer_step(layer: nn.TransformerDecoderLayer, x: torch.Tensor, memory: torch.Tensor,
                past: dict[tuple[str, str], torch.Tensor],
                bias: torch.Tensor) -> tuple[torch.Tensor, dict[tuple[str, str], torch.Tensor]]:
    """torch's post-norm TransformerDecoderLayer on new positions, both attentions through a cache.

    x, memory: [rows, new_len, d_model]; past: ("self" | "memory", "key" | "value") ->
    [rows, heads, past_len, head_dim]; bias: [rows, 1, new_len, past_len + new_len].
    Returns the new x and the caches grown by new_len positions.
    """
    grown = {}
    for part, mha, source in (("self", layer.self_attn, x), ("memory", layer.multihead_attn, memory)):
        grown[part, "key"] = torch.cat((past[part, "key"], project(mha, source, 1)), dim=2)
        grown[part, "value"] = torch.cat((past[part, "value"], project(mha, source, 2)), dim=2)
    sa, ca = layer.self_attn, layer.multihead_attn
    x = layer.norm1(x + sa.out_proj(merge_heads(attend(sa, project(sa, x, 0), grown["self", "key"],
                                                       grown["self", "value"], bias))))
    x = layer.norm2(x + ca.out_proj(merge_heads(attend(ca, project(ca, x, 0), grown["memory", "key"],
                                                       grown["memory", "value"], bias))))
    x = layer.norm3(x + layer.linear2(layer.activation(layer.linear1(x))))
    return x, grown


class SimpleDecoderOnly(TransformerLM):
    """Embedding, nn.TransformerDecoder of num_layers nn.TransformerDecoderLayer(d_model, nhead), linear
    output (torch's layer defaults: feed-forward 2048, dropout 0.1)."""

    def __init__(self, vocab_size: int, d_model: int, nhead: int, num_layers: int, *, dim_feedforward: int = 2048,
                 dropout: float = 0.1, positional_encoding: str = "sinusoidal"):
        super().__init__()
        check_dims(d_model, nhead, positional_encoding)
        self.d_model, self.nhead, self.positional_encoding = d_model, nhead, positional_encoding
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.transformer = nn.TransformerDecoder(
            nn.TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout), num_layers)
        self.fc_out = nn.Linear(d_model, vocab_size)


class DecoderOnly(SimpleDecoderOnly):
    """SimpleDecoderOnly with the plain DecoderOnly's fixed shape: 8 heads, 6 layers."""

    def __init__(self, vocab_size: int, hidden_size: int, *, dropout: float = 0.1,
                 positional_encoding: str = "sinusoidal"):
        super().__init__(vocab_size, hidden_size, 8, 6, dropout=dropout, positional_encoding=positional_encoding)
