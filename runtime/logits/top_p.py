"""TopP: transformers' TopPLogitsWarper (nucleus) with filter_value=-inf, min_tokens_to_keep=1 (sampling only)."""

from __future__ import annotations

import numpy as np

from runtime.errors import InvalidOptionError
from runtime.logits.checks import is_int


class TopP:
    """Keep the smallest set of most probable tokens whose probabilities add up to more than top_p.

    As in transformers: with tokens sorted by ascending score, a token is dropped while the
    probability mass up to and including it is <= 1 - top_p; the most probable token always stays.
    That mass only grows along the sorted order, so the dropped tokens are those below the first
    kept score, found with np.sort (no argsort/scatter). Tokens tied with that score are all kept,
    where transformers' unstable torch.sort keeps an arbitrary part of them.
    """

    def __init__(self, top_p: float):
        if not ((is_int(top_p) or isinstance(top_p, (float, np.floating))) and 0 <= top_p <= 1):
            raise InvalidOptionError(f"top_p={top_p!r}: expected a number in [0, 1] (1.0 turns top-p off)")
        self.top_p = float(top_p)

    def __call__(self, sequences: np.ndarray, scores: np.ndarray) -> None:
        """sequences: [rows, cur_len] int64 (unused); scores: [rows, vocab] float32, edited in place."""
        ascending = np.sort(scores, axis=1)  # [rows, vocab]
        probs = np.exp(ascending - ascending[:, -1:])  # softmax; the row maximum is last
        probs /= probs.sum(axis=1, keepdims=True)
        # torch's CPU cumsum accumulates float32 in double
        mass = np.cumsum(probs, axis=1, dtype=np.float64).astype(np.float32)
        dropped = (mass <= np.float32(1 - self.top_p)).sum(axis=1)  # [rows], a prefix of the sorted order
        dropped = np.minimum(dropped, scores.shape[1] - 1)  # min_tokens_to_keep = 1
        first_kept = np.take_along_axis(ascending, dropped[:, None], axis=1)  # [rows, 1]
        scores[scores < first_kept] = -np.inf
