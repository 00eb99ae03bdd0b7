"""Sampling: semantic and distributional properties (numpy's RNG cannot reproduce torch.multinomial's draws).

The decoder is a fixed random table of next-token logits per last token, so every step's
distribution is known and greedy search on the same table is the reference for the limits
(top_k=1, a tiny top_p).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from runtime.logits import TopK, TopP, build_rules, build_warpers
from runtime.options import GenerationOptions
from runtime.search.greedy import greedy_search
from runtime.search.sampling import draw, sample_search

VOCAB, EOS, PAD, START = 16, 2, 1, 0


class TableStep:
    """A DecoderStep whose logits depend only on each row's last token: table[last_ids]."""

    def __init__(self, table: np.ndarray):
        self.table = table  # [vocab, vocab] float32
        self.rows: int | None = None  # rows the next call must have (checks select's bookkeeping)
        self.calls: list[np.ndarray] = []  # last ids fed at each step

    def __call__(self, input_ids: np.ndarray) -> np.ndarray:
        assert input_ids.dtype == np.int64 and input_ids.ndim == 1
        assert self.rows is None or input_ids.shape[0] == self.rows
        self.rows = input_ids.shape[0]
        self.calls.append(input_ids.copy())
        return self.table[input_ids].copy()

    def select(self, rows: np.ndarray) -> None:
        assert self.rows is not None and np.all(np.diff(rows) > 0) and rows[-1] < self.rows
        self.rows = rows.shape[0]


def table(seed: int, eos_bias: float = 0.0) -> np.ndarray:
    logits = (np.random.default_rng(seed).standard_normal((VOCAB, VOCAB)) * 2).astype(np.float32)
    logits[:, EOS] += eos_bias
    return logits


def options(**overrides) -> GenerationOptions:
    return GenerationOptions.resolve({}, {"max_new_tokens": 12, "do_sample": True, **overrides}, eos_token_ids=(EOS,),
                                     pad_token_id=PAD, decoder_start_token_id=START)


def run_sampling(logits: np.ndarray, opts: GenerationOptions, batch: int = 4, warpers=None) -> np.ndarray:
    """[batch, steps] int64 of the tokens sample_search yields."""
    start = np.full(batch, START, dtype=np.int64)
    warpers = build_warpers(opts) if warpers is None else warpers
    steps = list(sample_search(TableStep(logits), start, build_rules(opts, VOCAB), warpers, opts))
    return np.stack(steps, axis=1)


def run_greedy(logits: np.ndarray, opts: GenerationOptions, batch: int = 4) -> np.ndarray:
    greedy = dataclasses.replace(opts, do_sample=False)
    start = np.full(batch, START, dtype=np.int64)
    return np.stack(list(greedy_search(TableStep(logits), start, build_rules(greedy, VOCAB), greedy)), axis=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("limit", [dict(top_k=1), dict(top_k=0, top_p=1e-6), dict(top_k=0, top_p=0.0)])
def test_greedy_limits_equal_greedy_search(seed, limit):
    logits = table(seed, eos_bias=1.0)
    opts = options(seed=seed, no_repeat_ngram_size=2, **limit)  # rules apply before the warpers
    np.testing.assert_array_equal(run_sampling(logits, opts), run_greedy(logits, opts))


def test_fixed_seed_is_deterministic_and_seeds_differ():
    logits = table(3) * 0.2  # flat distributions: many plausible continuations
    first, again = run_sampling(logits, options(seed=7)), run_sampling(logits, options(seed=7))
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, run_sampling(logits, options(seed=8)))


def test_samples_only_from_the_allowed_set():
    """Each token is among the 3 best of its step's scores (after the bad-words ban), never a banned word."""
    logits = table(4)
    tokens = run_sampling(logits, options(seed=0, top_k=3, bad_words_ids=[[5]], max_new_tokens=30), batch=8)
    banned_logits = logits.copy()
    banned_logits[:, 5] = -np.inf
    allowed = np.argsort(banned_logits, axis=1)[:, -3:]  # [last token, 3]
    checked = 0
    for row in tokens:
        last = START
        for token in row:
            if last == EOS:  # finished: pad from here on
                break
            assert token in allowed[last]
            last, checked = token, checked + 1
    assert checked > 8 * 3


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_draw_frequencies_match_softmax_of_scaled_scores(temperature):
    """20k draws per row: frequencies within 0.015 of softmax(scores / temperature), -inf never drawn."""
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((3, 6)).astype(np.float32)
    scores[:, 4] = -np.inf
    warped = scores.copy()
    for warper in build_warpers(options(temperature=temperature, top_k=0)):
        warper(np.zeros((3, 1), np.int64), warped)
    draws = np.stack([draw(warped, rng) for _ in range(20_000)])  # [draws, rows]
    expected = np.exp(scores / temperature - np.max(scores / temperature, axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    for row in range(3):
        frequencies = np.bincount(draws[:, row], minlength=6) / len(draws)
        np.testing.assert_allclose(frequencies, expected[row], atol=0.015)
        assert frequencies[4] == 0


def test_draw_keeps_top_p_nucleus():
    rng = np.random.default_rng(1)
    scores = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], dtype=np.float32))
    TopP(0.75)(np.zeros((1, 1), np.int64), scores)  # keeps 0.5 and 0.3 (mass 0.8 > 0.75)
    assert set(np.concatenate([draw(scores, rng) for _ in range(2000)])) == {0, 1}


def test_finished_rows_yield_pad_and_search_stops():
    logits = table(5, eos_bias=2.5)  # EOS likely: rows finish at different steps
    opts = options(seed=3, max_new_tokens=40)
    tokens = run_sampling(logits, opts, batch=6)
    assert tokens.shape[1] <= 40
    for row in tokens:
        ends = np.flatnonzero(row == EOS)
        assert ends.size, "every row emits EOS well before 40 tokens with this table"
        assert np.all(row[ends[0] + 1:] == PAD)
    assert np.any(tokens[:, -1] == EOS)  # stopped right after the last row finished


def test_stops_at_max_length_without_eos():
    logits = table(6)
    logits[:, EOS] = -np.inf
    tokens = run_sampling(logits, options(seed=0, max_new_tokens=7), batch=3)
    assert tokens.shape == (3, 7)


def test_min_new_tokens_delays_eos():
    """min_new_tokens bans EOS for the first steps even when EOS dominates."""
    logits = table(7, eos_bias=10.0)
    tokens = run_sampling(logits, options(seed=0, min_new_tokens=4, top_k=2), batch=5)
    assert not np.any(tokens[:, :4] == EOS)
    assert np.all(tokens[:, 4] == EOS)


def test_warpers_only_when_sampling():
    assert [type(w) for w in build_warpers(options(top_k=5, top_p=0.5))] == [TopK, TopP]
    assert build_warpers(dataclasses.replace(options(top_k=5, top_p=0.5), do_sample=False)) == []
