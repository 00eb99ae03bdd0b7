"""s2s-run's progress: a bar on stderr while it works (on a terminal only), and the one-line summary.

The bar is click's: lines done (of how many, when known), ETA, lines/s and generated tokens/s.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import click


class Progress:
    """Count lines and generated tokens; show them on stderr when `show` (stderr is a terminal).

    total: the lines this run has to do (None for a stream of unknown length: no ETA then).
    """

    def __init__(self, total: int | None, show: bool):
        self.lines = 0
        self.tokens = 0
        self.started = time.perf_counter()
        self._bar: Any = None
        if show:
            # click wants a length or an iterable; a generator has no length, so the bar shows only counts
            unknown = None if total is not None else (_ for _ in ())
            self._bar = click.progressbar(iterable=unknown, length=total, label="s2s-run", file=sys.stderr,
                                          show_pos=True, show_percent=False, show_eta=True,
                                          item_show_func=lambda _: self._rates())

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)

    def update(self, lines: int, tokens: int) -> None:
        self.lines += lines
        self.tokens += tokens
        if self._bar is not None:
            self._bar.update(lines)

    def summary(self) -> str:
        elapsed = time.perf_counter() - self.started
        return f"{self.lines} input(s) in {elapsed:.2f} s ({self._rates()})"

    def _rates(self) -> str:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return f"{self.lines / elapsed:.1f} lines/s, {self.tokens / elapsed:.0f} generated tokens/s"
