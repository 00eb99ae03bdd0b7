"""runtime/batching.py: batch plans keep every limit and every input, and results come back in input order."""

from __future__ import annotations

import random

import pytest

from runtime.batching import BatchLimits, InputOrder, cut_batches, windows
from runtime.errors import InvalidOptionError


@pytest.mark.parametrize("seed", range(20))
def test_cut_batches_keeps_limits_and_every_input(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 200))]
    limits = BatchLimits(batch_size=rng.randint(1, 16), max_batch_tokens=rng.choice([None, 30, 100, 400]))
    batches = cut_batches(lengths, limits)
    assert sorted(p for batch in batches for p in batch) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= limits.batch_size
        longest = max(lengths[p] for p in batch)
        if limits.max_batch_tokens is not None and len(batch) > 1:
            assert len(batch) * longest <= limits.max_batch_tokens
    # longest first, and each batch is as big as the limits let it be
    flat = [lengths[p] for batch in batches for p in batch]
    assert flat == sorted(flat, reverse=True)
    for batch in batches[:-1]:  # a batch ends only where the next input would break a limit
        grown = len(batch) + 1
        room = limits.max_batch_tokens is None or grown * lengths[batch[0]] <= limits.max_batch_tokens
        assert len(batch) == limits.batch_size or not room


def test_an_input_longer_than_the_token_budget_runs_alone():
    assert cut_batches([5, 50, 5, 5], BatchLimits(batch_size=8, max_batch_tokens=20)) == [[1], [0, 2, 3]]


def test_equal_lengths_keep_input_order():
    assert cut_batches([3, 3, 3, 3, 3], BatchLimits(batch_size=2, max_batch_tokens=None)) == [[0, 1], [2, 3], [4]]


def test_windows_read_only_what_they_hand_out():
    pulled = []

    def source():
        for i in range(10):
            pulled.append(i)
            yield i

    chunks = windows(source(), 4)
    assert next(chunks) == [0, 1, 2, 3]
    assert len(pulled) == 4
    assert list(chunks) == [[4, 5, 6, 7], [8, 9]]


def test_input_order_gives_results_back_as_soon_as_the_prefix_is_complete():
    order = InputOrder()
    order.put(2, "c")
    order.put(1, "b")
    assert list(order.ready()) == []
    order.put(0, "a")
    assert list(order.ready()) == ["a", "b", "c"]
    order.put(3, "d")
    assert list(order.ready()) == ["d"]


@pytest.mark.parametrize("limits", [dict(batch_size=0), dict(window=0), dict(max_batch_tokens=0),
                                    dict(batch_size=2.5), dict(window=True)])
def test_bad_limits_are_refused(limits):
    with pytest.raises(InvalidOptionError, match=next(iter(limits))):
        BatchLimits(**limits)
