"""--breakdown: how much of a generate call is spent inside onnxruntime's `session.run`, step by step.

`timed_sessions` wraps the `run` / `run_with_iobinding` methods of the given InferenceSession objects
(instance attributes shadowing the class's methods, removed on exit) to record when each run starts
and ends. Nothing in the runtime changes: the wrapping lives in the benchmark process only, for the
duration of the measured calls, which are separate from the timed latency runs.

For one call, the runs split its wall time into:
- inside: the sum of the session runs;
- outside: everything else, attributed to the run that follows it (the loop's work between two graph
  runs: logits rules, argmax, feeding state back), plus a tail after the last run (assembling the
  output).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

_METHODS = ("run", "run_with_iobinding")


@dataclass(frozen=True)
class Run:
    graph: str  # which session: the engine's name for it ("encoder", "decoder", ...)
    start: float  # time.perf_counter() seconds
    end: float


@contextmanager
def timed_sessions(sessions: dict[str, Any]) -> Iterator[list[Run]]:
    """Record every run of these sessions into the yielded list, while the context is open."""
    runs: list[Run] = []

    def timed(graph: str, method: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                runs.append(Run(graph, start, time.perf_counter()))
        return wrapper

    wrapped = []
    try:
        for graph, session in sessions.items():
            for name in _METHODS:
                setattr(session, name, timed(graph, getattr(session, name)))
                wrapped.append((session, name))
        yield runs
    finally:
        for session, name in wrapped:
            delattr(session, name)  # the class's method shows through again


def split_call(runs: list[Run], call_start: float, call_end: float) -> dict[str, Any]:
    """One call's time, split into session runs and the time outside them (see the module docstring)."""
    steps = []
    previous_end = call_start
    for run in runs:
        steps.append({"graph": run.graph, "inside_ms": (run.end - run.start) * 1000,
                      "outside_before_ms": (run.start - previous_end) * 1000})
        previous_end = run.end
    total = (call_end - call_start) * 1000
    inside = sum(step["inside_ms"] for step in steps)
    return {"total_ms": total, "inside_ms": inside, "outside_ms": total - inside,
            "tail_ms": (call_end - previous_end) * 1000, "runs": steps}


def summarize(calls: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals of the median call (by total time, so its parts add up); run by run, medians over calls
    (calls of the same work make the same sequence of runs)."""
    def median(values) -> float:
        return float(np.median(list(values)))

    lengths = {len(call["runs"]) for call in calls}
    if len(lengths) != 1:
        raise ValueError(f"calls made different numbers of session runs ({sorted(lengths)}); cannot align them")
    runs = []
    for index in range(lengths.pop()):
        at = [call["runs"][index] for call in calls]
        runs.append({"graph": at[0]["graph"], "inside_ms": median(r["inside_ms"] for r in at),
                     "outside_before_ms": median(r["outside_before_ms"] for r in at)})
    per_graph = {}
    for graph in dict.fromkeys(r["graph"] for r in runs):
        mine = [r for r in runs if r["graph"] == graph]
        per_graph[graph] = {"runs": len(mine), "inside_ms": sum(r["inside_ms"] for r in mine),
                            "median_inside_ms": median(r["inside_ms"] for r in mine),
                            "median_outside_before_ms": median(r["outside_before_ms"] for r in mine)}
    middle = sorted(calls, key=lambda c: c["total_ms"])[len(calls) // 2]
    return {
        "calls": len(calls),
        "total_ms": middle["total_ms"],
        "inside_ms": middle["inside_ms"],
        "outside_ms": middle["outside_ms"],
        "outside_pct": 100 * middle["outside_ms"] / middle["total_ms"] if middle["total_ms"] else 0.0,
        "tail_ms": middle["tail_ms"],
        "per_graph": per_graph,
        "runs": runs,
    }
