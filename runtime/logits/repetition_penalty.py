"""RepetitionPenalty: transformers' RepetitionPenaltyLogitsProcessor (CTRL's penalty)."""

from __future__ import annotations

import numpy as np

from runtime.logits.checks import require_positive_float


class RepetitionPenalty:
    """Penalise every token already in the decoder sequence, once per distinct token.

    Negative scores are multiplied by the penalty and the others divided by it, so the token
    becomes less likely either way. Like transformers, the sequence includes the decoder start
    token, and in beam search the rule sees log-probabilities (all <= 0), which it multiplies.
    """

    def __init__(self, penalty: float):
        self.penalty = require_positive_float("repetition_penalty", penalty, " (1.0 turns it off)")

    def __call__(self, sequences: np.ndarray, scores: np.ndarray) -> None:
        """sequences: [rows, cur_len] int64; scores: [rows, vocab] float32, edited in place."""
        rows = np.arange(scores.shape[0])[:, None]  # [rows, 1]
        # gather, penalise, scatter (torch.gather / torch.scatter): a token that occurs several times
        # is written several times with the same value, so it is penalised once.
        seen = scores[rows, sequences]  # [rows, cur_len]
        scores[rows, sequences] = np.where(seen < 0, seen * self.penalty, seen / self.penalty)
