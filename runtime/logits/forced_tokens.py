"""ForcedBOS, ForcedEOS: transformers' ForcedBOSTokenLogitsProcessor and ForcedEOSTokenLogitsProcessor."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from runtime.logits.checks import require_int, require_token_ids


class ForcedBOS:
    """Force `token_id` as the first generated token (the step after the decoder start token)."""

    def __init__(self, token_id: int):
        self.token_id = require_int("forced_bos_token_id", token_id, 0)

    def acts(self, cur_len: int) -> bool:
        """Whether the rule edits the scores at decoder length `cur_len` (see logits.shared_bans)."""
        return cur_len == 1

    def __call__(self, sequences: np.ndarray, scores: np.ndarray) -> None:
        """sequences: [rows, cur_len] int64; scores: [rows, vocab] float32, edited in place."""
        if sequences.shape[1] == 1:
            scores.fill(-np.inf)
            scores[:, self.token_id] = 0


class ForcedEOS:
    """Force EOS as the last token: the one that makes the decoder sequence max_length long.

    max_length counts decoder tokens with the start token (transformers' max_length after
    `generate` resolved max_new_tokens); with several EOS ids each gets score 0.
    """

    def __init__(self, max_length: int, eos_token_ids: int | Sequence[int]):
        self.max_length = require_int("max_length", max_length, 1)
        self.eos = require_token_ids("forced_eos_token_id", eos_token_ids)  # [n_eos] int64

    def acts(self, cur_len: int) -> bool:
        """Whether the rule edits the scores at decoder length `cur_len` (see logits.shared_bans)."""
        return cur_len == self.max_length - 1

    def __call__(self, sequences: np.ndarray, scores: np.ndarray) -> None:
        """sequences: [rows, cur_len] int64; scores: [rows, vocab] float32, edited in place."""
        if sequences.shape[1] == self.max_length - 1:
            scores.fill(-np.inf)
            scores[:, self.eos] = 0
