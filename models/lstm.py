"""The LSTM encoder-decoders: EncoderDecoder and EnhancedEncoderDecoder (batch-first, like the plain versions).

Class names, constructor arguments and parameter names are those of the plain versions, so their
state_dicts load with strict=True. What differs from the plain math (see models/README.md):
- the encoder skips source padding (a packed sequence): its final (h, c) is taken at each input's
  last real token, not after the padding;
- EnhancedEncoderDecoder's attention is called batch-first, with source padding masked. The plain
  version hands batch-first tensors to a sequence-first nn.MultiheadAttention, which then attends
  across the batch instead of across the source.
"""

from __future__ import annotations

import torch
from torch import nn

from models.layers import SEQ2SEQ_TOKENS, attend, key_padding_bias, merge_heads, project
from runtime.manifest import (
    ENCODER_ATTENTION_MASK,
    ENCODER_DECODER,
    ENCODER_HIDDEN_STATES,
    LAST_HIDDEN_STATE,
    StateTensor,
    encoder_inits,
)

ATTENTION_HEADS = 8  # fixed by the plain EnhancedEncoderDecoder


class EncoderDecoder(nn.Module):
    """Embedding, LSTM encoder, LSTM decoder started from the encoder's final (h, c), linear output."""

    kind = ENCODER_DECODER  # the export directory's kind (runtime/manifest.py)
    special_tokens = SEQ2SEQ_TOKENS  # what s2s_model.json's "special_tokens" names
    # decoder inputs the cached step reads besides input_ids and the states: none, (h, c) carry everything
    step_inputs: tuple[str, ...] = ()

    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, hidden_size)
        self.encoder = nn.LSTM(hidden_size, hidden_size, batch_first=True)
        self.decoder = nn.LSTM(hidden_size, hidden_size, batch_first=True)
        self.fc_out = nn.Linear(hidden_size, vocab_size)

    # -- whole sequences ------------------------------------------------------------------------------
    def forward(self, src: torch.Tensor, tgt: torch.Tensor,
                src_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The plain call: src [batch, src_len], tgt [batch, tgt_len] int64; src_attention_mask [batch, src_len]
        int64 (1 = token, padding on the right) or None for no padding. Returns logits [batch, tgt_len, vocab]."""
        if src_attention_mask is None:
            src_attention_mask = torch.ones_like(src)
        encoded = self.encode(src, src_attention_mask)
        decoder_output, _ = self.decoder(self.embedding(tgt), (encoded["present.h"], encoded["present.c"]))
        return self._output(decoder_output, encoded[LAST_HIDDEN_STATE], src_attention_mask)

    def full_forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     decoder_input_ids: torch.Tensor) -> torch.Tensor:
        """Teacher-forced logits: [batch, tgt_len, vocab] (the same call as `forward`, named like the others')."""
        return self(input_ids, decoder_input_ids, attention_mask)

    def _output(self, decoder_output: torch.Tensor, encoder_output: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        return self.fc_out(decoder_output)

    # -- the cached path -----------------------------------------------------------------------------
    def state_specs(self) -> tuple[StateTensor, ...]:
        """(h, c) of the decoder LSTM: [layers=1, batch, hidden], started from the encoder's final (h, c)."""
        return tuple(StateTensor(f"past.{name}", f"present.{name}", batch_axis=1, seq_axis=None, kind="recurrent",
                                 init="encoder", encoder_output=f"present.{name}") for name in ("h", "c"))

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask: [batch, src_len] int64, padding on the right ->
        {"last_hidden_state": [batch, src_len, hidden] (zeros at padding), "present.h"/"present.c": [1, batch, hidden]}.
        """
        packed = nn.utils.rnn.pack_padded_sequence(self.embedding(input_ids), attention_mask.sum(dim=1).cpu(),
                                                   batch_first=True, enforce_sorted=False)
        output, (h, c) = self.encoder(packed)
        output, _ = nn.utils.rnn.pad_packed_sequence(output, batch_first=True, total_length=input_ids.shape[1])
        return {LAST_HIDDEN_STATE: output, "present.h": h, "present.c": c}

    def start_states(self, encoded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: encoded[output] for name, output in encoder_inits(self.state_specs()).items()}

    def step(self, input_ids: torch.Tensor, encoder_inputs: dict[str, torch.Tensor],
             states: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One decoder position. input_ids: [rows, 1] int64; encoder_inputs: the tensors named in
        `step_inputs`; states: {"past.h", "past.c"}: [1, rows, hidden].
        Returns logits [rows, 1, vocab] and {"present.h", "present.c"}."""
        decoder_output, (h, c) = self.decoder(self.embedding(input_ids), (states["past.h"], states["past.c"]))
        return self._step_output(decoder_output, encoder_inputs), {"present.h": h, "present.c": c}

    def _step_output(self, decoder_output: torch.Tensor, encoder_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fc_out(decoder_output)


class AttentionLayer(nn.Module):
    """The plain version's wrapper: its `attention` attribute fixes the parameter names
    (`attention.attention.in_proj_weight`, ...)."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.attention = nn.MultiheadAttention(hidden_size, num_heads=ATTENTION_HEADS)

    def forward(self, query: torch.Tensor, memory: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Batch-first attention of query [batch, q, hidden] over memory [batch, src_len, hidden], padding
        (attention_mask [batch, src_len] int64 == 0) masked. torch's module is sequence-first: transpose."""
        out, _ = self.attention(query.transpose(0, 1), memory.transpose(0, 1), memory.transpose(0, 1),
                                key_padding_mask=attention_mask == 0, need_weights=False)
        return out.transpose(0, 1)

    def step(self, query: torch.Tensor, memory: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The same attention by hand, for the cached step and its export (finite masking, batch-first)."""
        mha = self.attention
        out = attend(mha, project(mha, query, 0), project(mha, memory, 1), project(mha, memory, 2),
                     key_padding_bias(attention_mask))
        return mha.out_proj(merge_heads(out))


class EnhancedEncoderDecoder(EncoderDecoder):
    """EncoderDecoder plus 8-head attention of the decoder outputs over the encoder outputs before fc_out."""

    step_inputs = (ENCODER_HIDDEN_STATES, ENCODER_ATTENTION_MASK)

    def __init__(self, vocab_size: int, hidden_size: int):
        if hidden_size % ATTENTION_HEADS:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by the {ATTENTION_HEADS} attention heads")
        super().__init__(vocab_size, hidden_size)
        self.attention = AttentionLayer(hidden_size)

    def _output(self, decoder_output: torch.Tensor, encoder_output: torch.Tensor,
                attention_mask: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.attention(decoder_output, encoder_output, attention_mask))

    def _step_output(self, decoder_output: torch.Tensor, encoder_inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.fc_out(self.attention.step(decoder_output, encoder_inputs[ENCODER_HIDDEN_STATES],
                                               encoder_inputs[ENCODER_ATTENTION_MASK]))
