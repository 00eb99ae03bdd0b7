"""Search strategies over one step interface; none knows the provider or the architecture.

- `greedy.py`: `greedy_search`, a generator (streaming is this generator; `generate` drains it);
  its steady steps drive a `PinnedStep` when the decoder offers one.
- `beam.py`: `beam_search`; it cannot stream (a beam's tokens are final only at the end).
- `sampling.py`: `sample_search`, multinomial sampling with temperature / top-k / top-p.
- `scoring.py`: `score_tokens`, the per-token scores beam search gave an answer (replayed once).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np

# DecoderStep.select's `shared`: per input, beams x beams leading tokens two beams have alike.
Shared = list[list[list[int]]]


class DecoderStep(Protocol):
    """One generate call's decoder: it owns that call's state tensors (KV cache, LSTM h/c).

    rows = batch * beams. Created per call by the runtime, so concurrent calls share nothing.
    """

    def __call__(self, input_ids: np.ndarray) -> np.ndarray:
        """Run one step. input_ids: [rows] int64, the last token of each row.

        Returns next-token logits, [rows, vocab] float32 on the host.
        """

    def select(self, rows: np.ndarray, shared: Shared | None = None) -> None:
        """Keep only state rows `rows` ([new_rows] int64 indices into the current rows), in that order.

        Beam search reorders beams with it; greedy search drops finished rows with it.
        shared: [n][beams][beams] ints (nested lists), given with a reorder that keeps
        the row count and each row among its input's rows (n inputs of `beams` rows each, beam search's):
        shared[i][a][b] leading tokens of rows i * beams + a and i * beams + b are the same (any number
        from their length on: all of them), so their cached positions there are too (a step may then
        copy only the positions after them, or ignore it).
        """


@dataclass(frozen=True)
class PinnedStep:
    """A call's steady step for a loop that writes the next ids itself (greedy search's fast path): write
    each row's token into `ids`, call `run`, read `scores`. Nothing per step is a numpy call: between two
    decoder runs the interpreter works on caches the graph has just flushed, where each numpy call costs
    microseconds (measured on the t5-small shape, int8, batch 1: two 1-element in-place adds between
    runs cost ~35 us a step), so the positions advance through memoryviews. Valid until the decoder's
    `select` or a run other than `run`."""

    ids: memoryview  # [rows] int64: the input ids of the next `run`
    scores: np.ndarray  # [rows, vocab] float32: a view of the logits each `run` writes (not with a head)
    run: Callable[[], None]
    # With a greedy head (the decoder's own argmax, exporter/passes/greedy_head.py), `run` writes no
    # logits but each row's argmax of logits + `bias` into `next_ids`:
    next_ids: memoryview | None = None  # [rows] int64
    bias: np.ndarray | None = None  # [vocab] float32, read by each `run`: -inf bans an id


class Candidates(NamedTuple):
    """A beam step's ranking: each active input's best `keep` continuations, best first (the arrays may
    be the step's own, which its next run writes over; runtime/search/log_probs.py makes them)."""

    scores: np.ndarray  # [n, keep] float32: the beam's running score plus the token's log-prob
    beams: np.ndarray  # [n, keep] int64: the beam each one extends
    token_ids: np.ndarray  # [n, keep] int64: the token each one adds
    stops: np.ndarray  # [n, keep] bool: ends in EOS or reaches max_length
    stopping: int  # how many stop


class LogitsRule(Protocol):
    def __call__(self, sequences: np.ndarray, scores: np.ndarray) -> None:
        """Edit scores in place. sequences: [rows, cur_len] int64 (start token included);
        scores: [rows, vocab] float32."""
