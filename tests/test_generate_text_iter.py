"""Model.generate_text_iter: the texts `generate_text` gives, in input order, reading its iterable lazily."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import runtime
from runtime.errors import InputItemError, InvalidOptionError
from tests.fixtures.hf_models import SAMPLE_TEXTS

# 14 texts of varied lengths, so that windows of 5 and batches of 2 reorder them
TEXTS = [f"{SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]} {' '.join(['again'] * (i % 4))}".strip() for i in range(14)]


@pytest.fixture(scope="module")
def t5(exported_dir):
    return runtime.load(exported_dir("t5"), provider="cpu")


@pytest.mark.parametrize("limits", [dict(window=5, batch_size=2, max_batch_tokens=None),
                                    dict(window=4, batch_size=8, max_batch_tokens=40),
                                    dict()])
def test_equals_generate_text(t5, limits):
    expected = t5.generate_text(TEXTS, max_new_tokens=8)
    assert list(t5.generate_text_iter(iter(TEXTS), max_new_tokens=8, **limits)) == expected


def test_several_sequences_per_input_come_as_lists(exported_dir):
    model = runtime.load(exported_dir("bart"), provider="cpu")
    texts = TEXTS[:7]
    flat = model.generate_text(texts, num_beams=3, num_return_sequences=2, max_new_tokens=6)
    results = list(model.generate_text_iter(texts, window=3, batch_size=2, num_beams=3, num_return_sequences=2,
                                            max_new_tokens=6))
    assert results == [flat[2 * i: 2 * i + 2] for i in range(len(texts))]


def test_with_scores_matches_generate_with_scores_without_batch_padding(exported_dir):
    model = runtime.load(exported_dir("bart"), provider="cpu")
    texts = TEXTS[:6]
    options = dict(num_beams=2, max_new_tokens=7)
    ids, mask = model.encode_text(texts)
    expected = model.generate_with_scores(ids, mask, **options)
    eos = model.manifest.eos_token_ids
    results = list(model.generate_text_iter_with_scores(texts, window=4, batch_size=3, **options))
    for row, result in enumerate(results):
        (own,) = result.token_ids
        assert own[-1] in eos or own.shape[0] == expected.sequences.shape[1]  # ends at its EOS: no padding
        np.testing.assert_array_equal(own, expected.sequences[row, : own.shape[0]])
        assert (expected.sequences[row, own.shape[0]:] == model.manifest.pad_token_id).all()
        # padding a row differently moves float32 scores in their last bits only
        np.testing.assert_allclose(result.scores, expected.scores[row: row + 1], rtol=1e-5)
        assert result.generated_tokens == own.shape[0] - 1


SAMPLING = dict(do_sample=True, seed=3, max_new_tokens=8)


def test_seeded_sampling_draws_follow_the_batch_plan(t5):
    """As documented: the same texts, limits and seed draw the same again (what s2s-run --resume relies on), and a
    text alone in its batch draws what generate_text draws for it alone."""
    limits = dict(window=5, batch_size=2, max_batch_tokens=None)
    first = list(t5.generate_text_iter(TEXTS, **limits, **SAMPLING))
    assert list(t5.generate_text_iter(iter(TEXTS), **limits, **SAMPLING)) == first
    alone = list(t5.generate_text_iter(TEXTS, window=5, batch_size=1, **SAMPLING))
    assert alone == [t5.generate_text([text], **SAMPLING)[0] for text in TEXTS]
    assert alone != first  # the draws do depend on the plan, so the docstring is right to say so


def test_reads_the_iterable_lazily(t5):
    pulled = []

    def texts():
        for text in itertools.cycle(TEXTS):  # endless: only a lazy reader gets anywhere
            pulled.append(text)
            yield text

    results = t5.generate_text_iter(texts(), window=4, batch_size=2, max_new_tokens=3)
    first = list(itertools.islice(results, 6))
    assert first == t5.generate_text(TEXTS[:6], max_new_tokens=3)
    assert len(pulled) <= 8  # two windows, not the stream


def test_bad_limits_and_options_fail_at_the_call_before_reading(t5):
    def untouchable():
        raise AssertionError("read before the options were checked")
        yield  # a generator

    with pytest.raises(InvalidOptionError, match="batch_size"):
        t5.generate_text_iter(untouchable(), batch_size=0)
    with pytest.raises(InvalidOptionError, match="num_beams"):
        t5.generate_text_iter(untouchable(), num_beams=0)


def test_a_bad_text_is_named_by_its_position_in_the_whole_iterable(t5):
    texts = TEXTS[:9] + ["  "] + TEXTS[:3]
    results = t5.generate_text_iter(texts, window=4, batch_size=2, max_new_tokens=3)
    with pytest.raises(InputItemError, match="input 10 is empty") as caught:
        list(results)
    assert caught.value.index == 9
