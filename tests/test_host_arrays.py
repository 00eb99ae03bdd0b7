"""runtime/host_arrays.py: a finished call's buffer block, logits and repeated encoder outputs are the next
call's memory.

The oracle for tokens is a model that has run nothing before (its memory fresh), against one whose
memory holds what other calls (other batches, beams, lengths) left in it.
"""

from __future__ import annotations

import numpy as np
import pytest

import runtime
from runtime.host_arrays import SpareArrays
from runtime.sessions import device_array
from tests.fixtures.hf_models import SAMPLE_TEXTS


def _address(array: np.ndarray) -> int:
    return array.__array_interface__["data"][0]


def test_memory_handed_back_is_the_next_request_s_when_large_enough():
    spare = SpareArrays()
    first = spare.empty((4, 8), np.float32)
    address = _address(first)
    spare.give(first)
    del first
    smaller = spare.empty((2, 3, 2), np.int64)  # 96 bytes in the 128 handed back
    assert _address(smaller) == address and smaller.shape == (2, 3, 2) and smaller.flags.c_contiguous
    assert spare.empty((4, 8), np.float32).base is not smaller.base  # taken: not handed out twice


def test_a_spare_too_small_is_dropped_before_allocating():
    spare = SpareArrays()
    small = spare.empty((4,), np.float32)
    spare.give(small)
    del small
    big = spare.empty((1000,), np.float32)
    assert big.nbytes == 4000
    spare.give(big)
    del big
    assert spare.empty((10,), np.float32).base.nbytes == 4000  # the small one is gone


def test_memory_still_in_use_is_not_kept():
    spare = SpareArrays()
    viewed = spare.empty((4, 8), np.float32)
    row = viewed[1]  # a view keeps reading that memory
    spare.give(viewed)
    del viewed
    wrapped = spare.empty((4, 8), np.float32)
    assert _address(wrapped) != _address(row)  # the viewed memory was not handed back
    value = device_array(wrapped, "cpu")  # an OrtValue over it (the decoder's binding holds such)
    spare.give(wrapped)
    del wrapped
    assert _address(spare.empty((4, 8), np.float32)) != _address(value.numpy())


def test_at_most_keep_spares_the_largest_kept():
    spare = SpareArrays(keep=2)
    arrays = [spare.empty((n,), np.uint8) for n in (10, 30, 20)]
    sizes = [a.nbytes for a in arrays]
    while arrays:
        array = arrays.pop()
        spare.give(array)  # by the caller's last name for it
        del array
    assert sizes == [10, 30, 20]
    assert sorted(s.nbytes for s in spare._spares) == [20, 30]


@pytest.fixture
def recorded_blocks(monkeypatch):
    """For every array SpareArrays hands out, in order: its shape, and whether it is a spare's memory."""
    handed: list[tuple[tuple[int, ...], bool]] = []
    empty = SpareArrays.empty

    def record(self, shape, dtype):
        spares = {_address(s) for s in self._spares}
        array = empty(self, shape, dtype)
        handed.append((tuple(shape), _address(array) in spares))
        return array

    monkeypatch.setattr(SpareArrays, "empty", record)
    return handed


@pytest.mark.parametrize("num_beams", [1, 4])
def test_a_call_runs_in_the_memory_of_the_call_before(num_beams, exported_dir, hf_tokenizer, recorded_blocks):
    model = runtime.load(exported_dir("t5"), provider="cpu")
    batch = hf_tokenizer("t5")(SAMPLE_TEXTS[:2], return_tensors="np", padding=True)
    for _ in range(2):
        model.generate(batch["input_ids"], batch["attention_mask"], num_beams=num_beams, max_new_tokens=8,
                       min_new_tokens=8)
    blocks = [reused for shape, reused in recorded_blocks if len(shape) > 3]  # [n, rows, heads, length, size]
    logits = [reused for shape, reused in recorded_blocks if len(shape) == 3]  # [rows, 1, vocab]
    repeated = [reused for shape, reused in recorded_blocks if len(shape) == 1]  # encoder outputs x beams, bytes
    assert blocks == logits == [False, True]
    assert repeated == ([False, True] if num_beams > 1 else [])


def test_tokens_do_not_depend_on_what_earlier_calls_left(exported_dir, hf_tokenizer):
    tokenizer = hf_tokenizer("t5")
    small = tokenizer(SAMPLE_TEXTS[:1], return_tensors="np")
    wide = tokenizer(SAMPLE_TEXTS[:3], return_tensors="np", padding=True)
    options = [dict(num_beams=1, max_new_tokens=10), dict(num_beams=3, max_new_tokens=9, no_repeat_ngram_size=2)]
    expected = [runtime.load(exported_dir("t5"), provider="cpu").generate_with_scores(
        small["input_ids"], small["attention_mask"], **o) for o in options]
    used = runtime.load(exported_dir("t5"), provider="cpu")
    for o, want in zip(options, expected):
        used.generate(wide["input_ids"], wide["attention_mask"], num_beams=4, max_new_tokens=12)  # fills memory
        got = used.generate_with_scores(small["input_ids"], small["attention_mask"], **o)
        np.testing.assert_array_equal(got.sequences, want.sequences, err_msg=str(o))
        if want.scores is not None:
            np.testing.assert_array_equal(got.scores, want.scores)


def test_a_stream_left_early_hands_its_memory_back(exported_dir, hf_tokenizer, recorded_blocks):
    model = runtime.load(exported_dir("t5"), provider="cpu")
    batch = hf_tokenizer("t5")(SAMPLE_TEXTS[:1], return_tensors="np")
    stream = model.stream(batch["input_ids"], batch["attention_mask"], max_new_tokens=10, min_new_tokens=10)
    first = [next(stream) for _ in range(3)]
    stream.close()
    again = list(model.stream(batch["input_ids"], batch["attention_mask"], max_new_tokens=10, min_new_tokens=10))
    np.testing.assert_array_equal(np.stack(first), np.stack(again[:3]))
    assert [reused for shape, reused in recorded_blocks if len(shape) > 3] == [False, True]
