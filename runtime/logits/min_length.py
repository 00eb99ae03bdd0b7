"""MinLength: ban EOS until the decoder sequence reaches min_length (transformers' MinLengthLogitsProcessor)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from runtime.logits.checks import require_int, require_token_ids


class MinLength:
    """Ban EOS while the decoder sequence (start token included) is shorter than min_length.

    transformers' `generate` turns min_new_tokens into min_length = min_new_tokens + 1 for
    encoder-decoders (the decoder prompt is the start token alone) and then also adds
    MinNewTokensLengthLogitsProcessor, which bans EOS at exactly the same steps; this one rule
    stands for both (`GenerationOptions.total_min_length`).
    """

    def __init__(self, min_length: int, eos_token_ids: Sequence[int]):
        self.min_length = require_int("min_length", min_length, 0)
        self.eos = tuple(int(t) for t in require_token_ids("eos_token_id", eos_token_ids))

    def banned(self, cur_len: int) -> tuple[int, ...]:
        """The ids this rule sets to -inf in every row at decoder length `cur_len` (see logits.shared_bans)."""
        return self.eos if cur_len < self.min_length else ()

    def __call__(self, sequences: np.ndarray, scores: np.ndarray) -> None:
        """sequences: [rows, cur_len] int64; scores: [rows, vocab] float32, edited in place."""
        if sequences.shape[1] < self.min_length:
            for token in self.eos:  # a column write each: fancy indexing allocated every step (py-spy)
                scores[:, token] = -np.inf
