"""runtime/window_tail.py: a resumed run starts at the first text of the window in progress, so its windows fall
where an uninterrupted run's fell."""

from __future__ import annotations

import random
from itertools import chain, islice

import pytest

from runtime.batching import windows
from runtime.input_lines import InputItem
from runtime.window_tail import WindowTail


def _items(skipped: list[bool]) -> list[InputItem]:
    return [InputItem(number, "'in.txt'", "" if skip else f"text {number}", None, skip)
            for number, skip in enumerate(skipped, start=1)]


def _text_windows(items, size):
    """The windows of texts the model is given (skipped items belong to none), as line numbers."""
    return [[item.number for item in window] for window in windows((i for i in items if not i.skipped), size)]


@pytest.mark.parametrize("seed", range(30))
def test_the_resumed_windows_are_those_of_the_uninterrupted_run(seed):
    rng = random.Random(seed)
    items = _items([rng.random() < 0.25 for _ in range(rng.randint(1, 40))])
    size = rng.randint(1, 6)
    done = rng.randint(0, len(items))
    source = iter(items)
    reader = WindowTail(source, size)
    assert list(islice(reader, done)) == items[:done]  # what resume reads and checks against the partial
    tail = reader.tail()
    assert tail == items[done - len(tail): done]  # the last items done, and only those
    texts_before = sum(not item.skipped for item in items[: done - len(tail)])
    assert texts_before % size == 0  # the resumed run's first text starts a window of the uninterrupted run
    assert tail == [] or (not tail[0].skipped and sum(not item.skipped for item in tail) < size)
    # the rest of the input follows on from the source: the resumed windows are the uninterrupted run's last ones
    resumed = _text_windows(chain(tail, source), size)
    whole = _text_windows(items, size)
    assert resumed == whole[len(whole) - len(resumed):]
    skipped_windows = whole[: len(whole) - len(resumed)]  # not run again: every input of them is done
    assert all(number <= done for window in skipped_windows for number in window)


def test_skipped_items_after_a_full_window_are_not_run_again():
    items = _items([False, False, True, False])  # window 2: texts 1, 2 | 4; line 3 is skipped
    reader = WindowTail(iter(items), 2)
    assert list(islice(reader, 3)) == items[:3]
    assert reader.tail() == []
    reader = WindowTail(iter(items), 2)
    assert list(reader) == items
    assert reader.tail() == items[3:]
