"""Where a resumed s2s-run starts again: at the first input of the window that was in progress.

A window's batches are cut from its lengths alone (runtime/batching.py), and sampling draws, like the
last float32 bits of beam scores, depend on the batch an input runs in. So a resumed run that cut its
windows from the first input not yet written would write other bytes than one uninterrupted run. It
runs the window in progress again from its start instead, and drops the results already written: the
windows, and so the batches, fall where the uninterrupted run's fell. That costs at most one window of
inputs done twice.

Windows count texts, the inputs the model is given: a skipped (empty) input belongs to none.
"""

from __future__ import annotations

from collections.abc import Iterator

from runtime.input_lines import InputItem


class WindowTail:
    """Pass items through, keeping those read since the first text of the window in progress.

    window: texts per window (the run's --window, >= 1).
    """

    def __init__(self, items: Iterator[InputItem], window: int):
        self._items = items
        self._window = window
        self._texts = 0  # texts read so far
        self._tail: list[InputItem] = []

    def __iter__(self) -> Iterator[InputItem]:
        """The items, each pulled from the source only when asked for (the source then resumes after it)."""
        for item in self._items:
            if not item.skipped:
                if self._texts % self._window == 0:  # the first text of a window: the tail starts again here
                    self._tail.clear()
                self._texts += 1
            self._tail.append(item)
            yield item

    def tail(self) -> list[InputItem]:
        """The items read since the first text of the window in progress, that text first; [] when the
        texts read so far fill whole windows (the next window starts after what was read)."""
        return [] if self._texts % self._window == 0 else list(self._tail)
