"""`Model.generate_text_iter`'s pipeline: texts from any iterable, generated in length-sorted batches.

The iterable is read `window` texts at a time (runtime/batching.py). Each window is tokenized at once
and checked (an empty text, or one too long without truncation, raises `InputItemError` naming its
position in the whole iterable, before any of the window runs), cut into batches by rows and padded
source tokens, and each batch goes through `Model.generate_with_scores`: batching lives above the decode
loop, which it leaves untouched. A result is yielded as soon as every earlier input's result is known.
Memory holds one window (its token ids and results waiting for an earlier one) and one batch.

Padding a row differently can move float32 results in their last bits, so beam scores (and, at an
exact tie, a token) may differ between batch plans; greedy and beam tokens are otherwise those of one
`generate` call. Sampling draws depend on the plan itself: every batch's `generate_with_scores` call
seeds its generator with `seed` again, and a row's draws follow from its place in its batch. The plan
depends only on the texts and the limits, so the same texts, limits and seed give the same results
(which s2s-run's --resume relies on: runtime/window_tail.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from runtime.batching import BatchLimits, InputOrder, cut_batches, windows
from runtime.errors import InputItemError

if TYPE_CHECKING:
    from runtime.model import Model


@dataclass(frozen=True, slots=True)  # slots: a window's results may wait for an earlier one
class TextGeneration:
    """One input's result.

    texts: its num_return_sequences outputs (best first with beam search).
    token_ids: per output, [length] int64: the decoder start token, the generated tokens, and the EOS
        if one was generated; no padding, so a result does not depend on the batch it ran in.
    scores: [num_return_sequences] float32 beam scores (transformers' `sequences_scores`), or None for
        greedy search and sampling.
    """

    texts: list[str]
    token_ids: list[np.ndarray]
    scores: np.ndarray | None

    @property
    def generated_tokens(self) -> int:
        """Tokens generated for this input, over all its outputs (the start token not counted)."""
        return sum(ids.shape[0] - 1 for ids in self.token_ids)


class InputsTruncatedWarning(UserWarning):
    """Some inputs were cut to the model's maximum; `indices` are their 0-based positions among the inputs."""

    def __init__(self, indices: Sequence[int], limit: int):
        super().__init__(f"inputs {[i + 1 for i in indices]} are longer than {limit} tokens and were truncated")
        self.indices = tuple(indices)
        self.limit = limit


def generate_text_stream(model: Model, texts: Iterable[str], limits: BatchLimits, truncate: bool,
                         options: dict[str, Any]) -> Iterator[TextGeneration]:
    """Yield one TextGeneration per text of `texts`, in input order (see the module docstring).

    options: generation options, already checked by the caller with `model.options(**options)`.

    Raises (while iterating):
        InputItemError: a text is empty, or longer than the model's maximum and truncate is False.
    """
    opts = model.options(**options)
    per_input = opts.num_return_sequences
    eos = np.asarray(opts.eos_token_ids, dtype=np.int64)
    limit = model.manifest.max_source_positions
    results: InputOrder[TextGeneration] = InputOrder()
    first = 0  # index of the window's first text among all texts
    for window in windows(texts, limits.window):
        try:
            ids, truncated = model.text.token_ids(window, max_length=limit, truncate=truncate)
        except InputItemError as err:  # its index is the position in the window; name it in the whole stream
            raise InputItemError(first + err.index, err.problem) from None
        if truncated and limit is not None:  # truncation happens only under a limit
            warnings.warn(InputsTruncatedWarning([first + i for i in truncated], limit), stacklevel=2)
        for batch in cut_batches([len(seq) for seq in ids], limits):
            input_ids, attention_mask = model.text.pad([ids[position] for position in batch])
            generated = model.generate_with_scores(input_ids, attention_mask, **options)
            decoded = model.text.decode(generated.sequences)
            rows = _without_padding(generated.sequences, eos)
            for j, position in enumerate(batch):
                own = slice(j * per_input, (j + 1) * per_input)
                scores = generated.scores[own] if generated.scores is not None else None
                results.put(first + position, TextGeneration(decoded[own], rows[own], scores))
            yield from results.ready()
        first += len(window)


def _without_padding(sequences: np.ndarray, eos_token_ids: np.ndarray) -> list[np.ndarray]:
    """sequences: [rows, length] int64 -> each row up to its first EOS after the start token (kept), or whole."""
    is_eos = np.isin(sequences[:, 1:], eos_token_ids)  # [rows, length - 1]
    ends = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 2, sequences.shape[1])
    # copies, not views: a result outlives its batch
    return [sequences[row, :end].copy() for row, end in enumerate(ends.tolist())]
