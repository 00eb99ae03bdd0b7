"""TopK: transformers' TopKLogitsWarper with filter_value=-inf, min_tokens_to_keep=1 (sampling only)."""

from __future__ import annotations

import numpy as np

from runtime.logits.checks import require_int


class TopK:
    """Keep the k highest scores of each row (and every score tied with the k-th); set the rest to -inf."""

    def __init__(self, top_k: int):
        self.top_k = require_int("top_k", top_k, 1, " (0 turns top-k off)")

    def __call__(self, sequences: np.ndarray, scores: np.ndarray) -> None:
        """sequences: [rows, cur_len] int64 (unused); scores: [rows, vocab] float32, edited in place."""
        vocab = scores.shape[1]
        k = min(self.top_k, vocab)
        # a row with at most k scores above -inf keeps them all (its k-th best is -inf); skipping
        # them also spares np.partition its slow case, a row of mostly equal (-inf) values
        if (scores > -np.inf).sum(axis=1).max() <= k:
            return
        kth_best = np.partition(scores, vocab - k, axis=1)[:, vocab - k, None]  # [rows, 1]
        scores[scores < kth_best] = -np.inf
