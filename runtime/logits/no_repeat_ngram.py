"""NoRepeatNgram: transformers' NoRepeatNGramLogitsProcessor (fairseq's no_repeat_ngram)."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from runtime.logits.checks import require_int


class NoRepeatNgram:
    """Ban every token that would complete an n-gram already in the decoder sequence.

    The sequence includes the decoder start token, as in transformers (with n = 1 the start token
    itself is banned).
    """

    def __init__(self, ngram_size: int):
        self.n = require_int("no_repeat_ngram_size", ngram_size, 1, " (0 turns the rule off)")

    def __call__(self, sequences: np.ndarray, scores: np.ndarray) -> None:
        """sequences: [rows, cur_len] int64; scores: [rows, vocab] float32, edited in place."""
        cur_len = sequences.shape[1]
        if cur_len < self.n:  # no complete n-gram yet
            return
        ngrams = sliding_window_view(sequences, self.n, axis=1)  # [rows, cur_len - n + 1, n], a view
        prefix = sequences[:, cur_len - self.n + 1:]  # [rows, n - 1]: the n-gram the next token completes
        seen_before = (ngrams[:, :, :-1] == prefix[:, None, :]).all(axis=2)  # [rows, cur_len - n + 1]
        rows, starts = np.nonzero(seen_before)
        scores[rows, ngrams[rows, starts, -1]] = -np.inf
