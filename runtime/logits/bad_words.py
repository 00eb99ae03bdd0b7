"""BadWords: transformers' NoBadWordsLogitsProcessor."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from runtime.errors import InvalidOptionError
from runtime.logits.checks import require_token_ids


class BadWords:
    """Ban the last token of every bad word whose other tokens end the decoder sequence.

    A one-token bad word is banned at every step. Like transformers: a bad word that is exactly one
    EOS token is dropped (EOS stays allowed), a bad word longer than the sequence plus one is not
    checked, and the ban is added as a -inf bias (so a +inf score becomes NaN, as there).
    """

    def __init__(self, bad_words_ids: Sequence[Sequence[int]], eos_token_ids: Sequence[int]):
        if isinstance(bad_words_ids, (str, bytes)) or not bad_words_ids:
            raise InvalidOptionError(f"bad_words_ids={bad_words_ids!r}: expected a non-empty list of token-id lists")
        words = [tuple(int(t) for t in require_token_ids("bad_words_ids", word)) for word in bad_words_ids]
        eos = {int(t) for t in eos_token_ids}
        words = [w for w in words if not (len(w) == 1 and w[0] in eos)]
        if not words:
            raise InvalidOptionError(
                f"bad_words_ids={bad_words_ids!r}: only EOS tokens, which are never banned (transformers "
                "drops them); ban them with min_length / min_new_tokens instead"
            )
        self.single = np.unique([w[0] for w in words if len(w) == 1]).astype(np.int64)  # [n_single]
        by_length: dict[int, list[tuple[int, ...]]] = defaultdict(list)
        for w in set(words):
            if len(w) > 1:
                by_length[len(w)].append(w)
        # one group per length: (prefixes [n_words, length - 1] int64, last tokens [n_words] int64)
        self.groups = [
            (np.asarray([w[:-1] for w in group], dtype=np.int64), np.asarray([w[-1] for w in group], dtype=np.int64))
            for _, group in sorted(by_length.items())
        ]

    def __call__(self, sequences: np.ndarray, scores: np.ndarray) -> None:
        """sequences: [rows, cur_len] int64; scores: [rows, vocab] float32, edited in place."""
        cur_len = sequences.shape[1]
        if self.single.size:
            scores[:, self.single] += -np.inf
        for prefixes, last in self.groups:
            prefix_len = prefixes.shape[1]
            if prefix_len + 1 > cur_len:  # transformers skips a word longer than the sequence
                continue
            tail = sequences[:, cur_len - prefix_len:]  # [rows, prefix_len]
            matches = (tail[:, None, :] == prefixes[None, :, :]).all(axis=2)  # [rows, n_words]
            rows, words = np.nonzero(matches)
            scores[rows, last[words]] += -np.inf
