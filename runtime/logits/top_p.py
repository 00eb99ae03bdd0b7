"""TopP: transformers' TopPLogitsWarper (nucleus) with filter_value=-inf, min_tokens_to_keep=1 (sampling only)."""

from __future__ import annotations

import numpy as np

from runtime.errors import InvalidOptionError
from runtime.logits.checks import is_int


class TopP:
    """Keep the smallest set of most probable tokens whose probabilities add up to more than top_p.

    As in transformers: tokens are sorted by ascending score and a token is dropped while the
    probability mass up to and including it is <= 1 - top_p; the most probable token always stays.
    """

    def __init__(self, top_p: float):
        if not ((is_int(top_p) or isinstance(top_p, (float, np.floating))) and 0 <= top_p <= 1):
            raise InvalidOptionError(f"top_p={top_p!r}: expected a number in [0, 1] (1.0 turns top-p off)")
        self.top_p = float(top_p)

    def __call__(self, sequences: np.ndarray, scores: np.ndarray) -> None:
        """sequences: [rows, cur_len] int64 (unused); scores: [rows, vocab] float32, edited in place."""
        order = np.argsort(scores, axis=1, kind="stable")  # [rows, vocab], ascending
        ascending = np.take_along_axis(scores, order, axis=1)
        probs = np.exp(ascending - ascending[:, -1:])  # softmax; the row maximum is last
        probs /= probs.sum(axis=1, keepdims=True)
        # torch's CPU cumsum accumulates float32 in double
        mass = np.cumsum(probs, axis=1, dtype=np.float64).astype(np.float32)  # [rows, vocab]
        drop_sorted = mass <= np.float32(1 - self.top_p)
        drop_sorted[:, -1] = False  # min_tokens_to_keep = 1
        drop = np.empty_like(drop_sorted)
        np.put_along_axis(drop, order, drop_sorted, axis=1)
        scores[drop] = -np.inf
