"""Batches over a long stream of inputs: read a bounded window, sort it by length, cut it by rows and tokens.

Pure Python (no numpy), so that every front (s2s-run, a server's batcher, a Ray actor) plans batches the
same way. `windows` reads `window` inputs ahead at a time, so memory grows with the window, never with
the stream. `cut_batches` orders a window longest first, so a batch holds inputs of similar length and
pads little, and the heaviest batch of a window runs first (a budget too big for memory fails at once,
not at the window's end). A batch ends at `batch_size` rows, or when rows x longest source (the padded
source tokens, CTranslate2's `batch_type="tokens"`) would pass `max_batch_tokens`. `InputOrder` puts
results back in input order.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from typing import Generic, TypeVar

from runtime.errors import InvalidOptionError

# Measured on the t5-small shape, CPU, 2 threads (bench/batch_limits.py; figures in bench/README.md):
# 64 rows ran 15-30% faster than 16 or 32 on sentence-length lines, and the 2048-token cap was as fast
# as 4096 there while keeping long inputs to 614 MiB (4096: 744; no cap at 64 rows: 2240, 3x slower).
DEFAULT_BATCH_SIZE = 64
DEFAULT_MAX_BATCH_TOKENS = 2048
DEFAULT_WINDOW = 10_000

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class BatchLimits:
    batch_size: int = DEFAULT_BATCH_SIZE  # most rows (inputs) per batch
    max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS  # most rows x longest source tokens; None = no limit
    window: int = DEFAULT_WINDOW  # inputs read ahead and sorted by length together

    def __post_init__(self) -> None:
        for name, value in (("batch_size", self.batch_size), ("max_batch_tokens", self.max_batch_tokens),
                            ("window", self.window)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidOptionError(f"{name}={value!r}: must be an integer >= 1"
                                         + (" (or None for no limit)" if name == "max_batch_tokens" else ""))


def windows(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Consecutive chunks of `size` items (the last one may be shorter), each read only when asked for."""
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def cut_batches(lengths: Sequence[int], limits: BatchLimits) -> list[list[int]]:
    """Group the positions 0..len(lengths)-1 into batches, longest inputs first.

    lengths: source tokens of each input. A batch grows while it has fewer than `batch_size` rows and
    its rows x longest stays within `max_batch_tokens`; an input longer than `max_batch_tokens` alone
    gets a batch of its own (an input is never split). Every position lands in exactly one batch;
    equal lengths keep their input order.
    """
    # sorted() is stable with reverse=True too: ties stay in input order, so the plan is deterministic
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    batches: list[list[int]] = []
    current: list[int] = []
    for position in order:
        if current:
            longest = lengths[current[0]]  # the first row of a batch is its longest
            full = len(current) == limits.batch_size
            over = limits.max_batch_tokens is not None and (len(current) + 1) * longest > limits.max_batch_tokens
            if full or over:
                batches.append(current)
                current = []
        current.append(position)
    if current:
        batches.append(current)
    return batches


class InputOrder(Generic[R]):
    """Reorder buffer: results come in keyed by input index, in any order; `ready` gives them back in
    index order as soon as every earlier one is in. It holds only results waiting for an earlier one."""

    def __init__(self, first_index: int = 0):
        self._next = first_index
        self._waiting: dict[int, R] = {}

    def put(self, index: int, result: R) -> None:
        self._waiting[index] = result

    def ready(self) -> Iterator[R]:
        while self._next in self._waiting:
            yield self._waiting.pop(self._next)
            self._next += 1
