"""Step timing for the export pipeline: which step is running, and how long each took."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

# Called with (step, None) when a step starts and (step, seconds) when it ends.
ProgressFn = Callable[[str, "float | None"], None]


class Steps:
    """Times steps one after another; a source may split its own work into sub-steps with `start`."""

    def __init__(self, progress: ProgressFn | None = None):
        self._progress = progress
        self._running: tuple[str, float] | None = None
        self.timings: list[tuple[str, float]] = []  # (step, seconds), in order

    def start(self, name: str) -> None:
        """End the running step, if any, and start `name`."""
        self.end()
        self._running = (name, time.perf_counter())
        if self._progress is not None:
            self._progress(name, None)

    def end(self) -> None:
        if self._running is None:
            return
        name, started = self._running
        self._running = None
        seconds = time.perf_counter() - started
        self.timings.append((name, seconds))
        if self._progress is not None:
            self._progress(name, seconds)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time the block as step `name` (a failed step reports no time: the error says what happened)."""
        self.start(name)
        yield
        self.end()
