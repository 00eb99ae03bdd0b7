"""Test-only DecoderStep backed by a transformers torch model (no ONNX).

It calls the model the way transformers' `generate` does (encoder once, inputs repeated per beam,
one decoder token per step with an EncoderDecoderCache), so a search driven by it sees the same
logits as `generate` and its choices can be compared with `generate`'s token for token.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from runtime.search import Shared


class TorchDecoderStep:
    """DecoderStep over `model` for a batch of inputs, each repeated `num_beams` times (input-major).

    input_ids: [batch, src_len] int64; attention_mask: [batch, src_len] int64.
    """

    def __init__(self, model: torch.nn.Module, input_ids: np.ndarray, attention_mask: np.ndarray,
                 num_beams: int):
        self.model = model
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
        mask = torch.from_numpy(np.asarray(attention_mask, dtype=np.int64))
        with torch.no_grad():
            encoder_outputs = model.get_encoder()(input_ids=ids, attention_mask=mask, return_dict=True)
        # like generate's _expand_inputs_for_generation
        hidden = encoder_outputs.last_hidden_state.repeat_interleave(num_beams, dim=0)
        encoder_outputs["last_hidden_state"] = hidden
        self.encoder_outputs = encoder_outputs
        self.attention_mask = mask.repeat_interleave(num_beams, dim=0)
        decoder_config = model.config.get_text_config(decoder=True)
        self.cache = EncoderDecoderCache(DynamicCache(config=decoder_config),  # self-attention
                                         DynamicCache(config=decoder_config))  # cross-attention
        self.past_len = 0
        self.calls = 0  # decoder steps run
        self.rows_run = 0  # decoder rows run, summed over steps

    def __call__(self, input_ids: np.ndarray) -> np.ndarray:
        """input_ids: [rows] int64 -> logits [rows, vocab] float32."""
        decoder_input_ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64)).reshape(-1, 1)
        with torch.no_grad():
            outputs = self.model(
                encoder_outputs=self.encoder_outputs,
                attention_mask=self.attention_mask,
                decoder_input_ids=decoder_input_ids,
                past_key_values=self.cache,
                cache_position=torch.tensor([self.past_len]),
                use_cache=True,
                return_dict=True,
            )
        self.past_len += 1
        self.calls += 1
        self.rows_run += decoder_input_ids.shape[0]
        return outputs.logits[:, -1, :].to(torch.float32).numpy().copy()

    def select(self, rows: np.ndarray, shared: Shared | None = None) -> None:
        """Keep rows `rows` ([new_rows] int64) of the cache, encoder outputs and mask, in that order
        (whole rows, as transformers' reorder_cache does: shared is not used)."""
        index = torch.from_numpy(np.asarray(rows, dtype=np.int64))
        self.cache.reorder_cache(index)
        hidden = self.encoder_outputs.last_hidden_state.index_select(0, index)
        self.encoder_outputs["last_hidden_state"] = hidden
        self.attention_mask = self.attention_mask.index_select(0, index)
