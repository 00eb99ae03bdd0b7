"""The transformer encoder-decoders: InstructionLLM, HybridModel, EfficientInstructionLLM.

Class names, constructor arguments and parameter names are those of the plain versions, so their
state_dicts load with strict=True. What differs from the plain math (see models/README.md):
- the decoder is causal (the plain versions let position t see t+1.. during training, which no
  generation can reproduce);
- the source padding is masked in encoder self-attention and in cross-attention;
- `positional_encoding="sinusoidal"` (the default) adds a fixed sin/cos encoding, which has no
  parameters; pass "none" for the plain versions' order-blind math;
- EfficientInstructionLLM's encoder is bidirectional; `causal_encoder=True` restores the plain
  version's causal source mask.

`forward` keeps the plain sequence-first layout ([seq, batch] like nn.Transformer's default);
`full_forward`, `encode` and `step` are batch-first like transformers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from models.layers import (
    POSITIONAL_ENCODINGS,
    SEQ2SEQ_TOKENS,
    causal_mask,
    cross_attention_cache,
    decoder_layer_step,
    encoder_layer,
    key_padding_bias,
    sinusoidal_positions,
)
from runtime.manifest import ENCODER_ATTENTION_MASK, ENCODER_DECODER, LAST_HIDDEN_STATE, StateTensor, encoder_inits


def check_dims(d_model: int, nhead: int, positional_encoding: str) -> None:
    if d_model % nhead:
        raise ValueError(f"d_model={d_model} must be divisible by nhead={nhead}")
    if positional_encoding not in POSITIONAL_ENCODINGS:
        raise ValueError(f"positional_encoding={positional_encoding!r}: expected one of {list(POSITIONAL_ENCODINGS)}")
    if positional_encoding == "sinusoidal" and d_model % 2:
        raise ValueError(f"d_model={d_model} must be even for the sinusoidal positional encoding")


def _quiet_transformer(*args, **kwargs) -> nn.Transformer:
    """nn.Transformer, without its warning that sequence-first layers cannot use nested tensors
    (this layout is the plain versions'; their parameter names depend on it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
        return nn.Transformer(*args, **kwargs)


class TransformerSeq2Seq(nn.Module):
    """What the three transformer models share: embedding, positions, the cached step and its states.

    A subclass builds `embedding`, its encoder/decoder stacks and `fc_out`, sets `d_model`, `nhead`,
    `positional_encoding` (and `embed_scale`, `causal_encoder` where they differ), and names in
    `stack_paths` the submodules that are its nn.TransformerEncoder and nn.TransformerDecoder.
    """

    kind = ENCODER_DECODER  # the export directory's kind (runtime/manifest.py)
    special_tokens = SEQ2SEQ_TOKENS  # what s2s_model.json's "special_tokens" names
    stack_paths: tuple[str, str]  # (encoder, decoder) submodule paths, the plain versions' names
    embed_scale = 1.0
    causal_encoder = False
    # decoder inputs the cached step reads besides input_ids and the states
    step_inputs: tuple[str, ...] = (ENCODER_ATTENTION_MASK,)

    d_model: int
    nhead: int
    positional_encoding: str
    embedding: nn.Embedding
    fc_out: nn.Linear

    def stacks(self) -> tuple[nn.TransformerEncoder, nn.TransformerDecoder]:
        # get_submodule is typed Module: the paths name the stacks' own classes
        return (cast(nn.TransformerEncoder, self.get_submodule(self.stack_paths[0])),
                cast(nn.TransformerDecoder, self.get_submodule(self.stack_paths[1])))

    def _parts(self) -> tuple[Sequence[nn.TransformerEncoderLayer], nn.Module | None,
                              Sequence[nn.TransformerDecoderLayer], nn.Module | None]:
        """(encoder layers, encoder final norm, decoder layers, decoder final norm)."""
        encoder, decoder = self.stacks()
        # a ModuleList is typed as holding Modules: these hold the stacks' layer classes
        return (cast(Sequence[nn.TransformerEncoderLayer], encoder.layers), encoder.norm,
                cast(Sequence[nn.TransformerDecoderLayer], decoder.layers), decoder.norm)

    # -- embeddings ----------------------------------------------------------------------------------
    def embed(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """ids: [batch, seq] int64; positions: [seq] int64 -> [batch, seq, d_model]."""
        x = self.embedding(ids) * self.embed_scale
        if self.positional_encoding == "sinusoidal":
            x = x + sinusoidal_positions(positions, self.d_model)
        return x

    # -- whole sequences, torch's modules ---------------------------------------------------------------
    def forward(self, src: torch.Tensor, tgt: torch.Tensor,
                src_key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The plain call: src [src_len, batch], tgt [tgt_len, batch] int64, sequence-first.

        src_key_padding_mask: [batch, src_len] bool, True at padding (torch's convention), or None.
        Returns logits [tgt_len, batch, vocab].
        """
        src_x = self.embed(src.T, torch.arange(src.shape[0], device=src.device)).transpose(0, 1)
        tgt_x = self.embed(tgt.T, torch.arange(tgt.shape[0], device=tgt.device)).transpose(0, 1)
        src_mask = causal_mask(src.shape[0], src.device) if self.causal_encoder else None
        padding = None
        if src_key_padding_mask is not None:  # additive like the causal masks: torch warns on mixed kinds
            padding = torch.zeros(src_key_padding_mask.shape, device=src.device).masked_fill(
                src_key_padding_mask, float("-inf"))
        encoder, decoder = self.stacks()  # what nn.Transformer.forward runs, minus its shape checks
        memory = encoder(src_x, mask=src_mask, src_key_padding_mask=padding)
        output = decoder(tgt_x, memory, tgt_mask=causal_mask(tgt.shape[0], tgt.device),
                         memory_key_padding_mask=padding)
        return self.fc_out(output)

    def full_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     decoder_input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits, batch-first. input_ids, attention_mask: [batch, src_len] int64 (mask 1 =
        token); decoder_input_ids: [batch, tgt_len] int64. Returns [batch, tgt_len, vocab]."""
        return self(input_ids.T, decoder_input_ids.T, attention_mask == 0).transpose(0, 1)

    # -- the cached path -----------------------------------------------------------------------------
    def state_specs(self) -> tuple[StateTensor, ...]:
        """Per decoder layer: self-attention K/V (grow each step, empty at step 0) and cross-attention
        K/V (computed once by `encode`, never re-emitted). Layout [batch, heads, seq, head_dim]."""
        specs = []
        for i in range(len(self._parts()[2])):
            for part in ("key", "value"):
                specs.append(StateTensor(f"past_key_values.{i}.decoder.{part}", f"present.{i}.decoder.{part}",
                                         batch_axis=0, seq_axis=2, kind="grows", init="empty"))
            for part in ("key", "value"):
                specs.append(StateTensor(f"past_key_values.{i}.encoder.{part}", None, batch_axis=0, seq_axis=2,
                                         kind="fixed", init="encoder", encoder_output=f"present.{i}.encoder.{part}"))
        return tuple(specs)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask: [batch, src_len] int64 -> {"last_hidden_state": [batch, src_len, d_model],
        "present.{i}.encoder.key"/"value": [batch, heads, src_len, head_dim] for each decoder layer}."""
        encoder_layers, encoder_norm, decoder_layers, _ = self._parts()
        src_len = input_ids.shape[1]
        x = self.embed(input_ids, torch.arange(src_len, device=input_ids.device))
        bias = key_padding_bias(attention_mask)
        if self.causal_encoder:
            bias = bias + causal_mask(src_len, input_ids.device)
        for layer in encoder_layers:
            x = encoder_layer(layer, x, bias)
        if encoder_norm is not None:
            x = encoder_norm(x)
        outputs = {LAST_HIDDEN_STATE: x}
        for i, decoder_layer in enumerate(decoder_layers):
            outputs[f"present.{i}.encoder.key"], outputs[f"present.{i}.encoder.value"] = \
                cross_attention_cache(decoder_layer, x)
        return outputs

    def start_states(self, encoded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The step-0 states: cross K/V from `encoded`, self-attention K/V of length 0."""
        memory = encoded[LAST_HIDDEN_STATE]
        empty = memory.new_zeros(memory.shape[0], self.nhead, 0, self.d_model // self.nhead)
        inits = encoder_inits(self.state_specs())
        return {s.input_name: encoded[inits[s.input_name]] if s.input_name in inits else empty
                for s in self.state_specs()}

    def step(self, input_ids: torch.Tensor, encoder_inputs: dict[str, torch.Tensor],
             states: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One decoder position. input_ids: [rows, 1] int64; encoder_inputs: {"encoder_attention_mask":
        [rows, src_len] int64}; states: by state input name (see `state_specs`).

        Returns logits [rows, 1, vocab] and the grown self-attention K/V by state output name.
        The position is the cache length, read from the cache's shape, so an exported step needs no
        position input.
        """
        _, _, decoder_layers, decoder_norm = self._parts()
        past_len = states["past_key_values.0.decoder.key"].shape[2]
        x = self.embed(input_ids, torch.arange(past_len, past_len + 1, device=input_ids.device))
        memory_bias = key_padding_bias(encoder_inputs[ENCODER_ATTENTION_MASK])
        present = {}
        for i, layer in enumerate(decoder_layers):
            x, key, value = decoder_layer_step(
                layer, x, states[f"past_key_values.{i}.decoder.key"], states[f"past_key_values.{i}.decoder.value"],
                states[f"past_key_values.{i}.encoder.key"], states[f"past_key_values.{i}.encoder.value"], memory_bias)
            present[f"present.{i}.decoder.key"], present[f"present.{i}.decoder.value"] = key, value
        if decoder_norm is not None:
            x = decoder_norm(x)
        return self.fc_out(x), present


class InstructionLLM(TransformerSeq2Seq):
    """Shared embedding, nn.Transformer, linear output (nn.Transformer's defaults: feed-forward 2048, dropout 0.1)."""

    stack_paths = ("transformer.encoder", "transformer.decoder")

    def __init__(self, vocab_size: int, d_model: int, nhead: int, num_encoder_layers: int, num_decoder_layers: int,
                 *, dim_feedforward: int = 2048, dropout: float = 0.1, positional_encoding: str = "sinusoidal"):
        super().__init__()
        check_dims(d_model, nhead, positional_encoding)
        self.d_model, self.nhead, self.positional_encoding = d_model, nhead, positional_encoding
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.transformer = _quiet_transformer(d_model, nhead, num_encoder_layers, num_decoder_layers,
                                              dim_feedforward=dim_feedforward, dropout=dropout)
        self.fc_out = nn.Linear(d_model, vocab_size)


class EfficientInstructionLLM(InstructionLLM):
    """InstructionLLM with num_layers of each, feed-forward 4 * d_model, embeddings scaled by sqrt(d_model).

    causal_encoder=True keeps the plain version's causal mask on the encoder (for its checkpoints).
    """

    def __init__(self, vocab_size: int, d_model: int, nhead: int, num_layers: int, *, dropout: float = 0.1,
                 positional_encoding: str = "sinusoidal", causal_encoder: bool = False):
        super().__init__(vocab_size, d_model, nhead, num_layers, num_layers, dim_feedforward=4 * d_model,
                         dropout=dropout, positional_encoding=positional_encoding)
        self.embed_scale = math.sqrt(d_model)
        self.causal_encoder = causal_encoder


class HybridModel(TransformerSeq2Seq):
    """Shared embedding, nn.TransformerEncoder + nn.TransformerDecoder (no final norms), linear output."""

    stack_paths = ("encoder", "decoder")

    def __init__(self, vocab_size: int, d_model: int, nhead: int, num_encoder_layers: int, num_decoder_layers: int,
                 *, dim_feedforward: int = 2048, dropout: float = 0.1, positional_encoding: str = "sinusoidal"):
        super().__init__()
        check_dims(d_model, nhead, positional_encoding)
        self.d_model, self.nhead, self.positional_encoding = d_model, nhead, positional_encoding
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout),
                                             num_encoder_layers, enable_nested_tensor=False)
        self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout),
                                             num_decoder_layers)
        self.fc_out = nn.Linear(d_model, vocab_size)
