"""A case on every contestant at once: one worker process each, calls interleaved round by round.

A contestant is one engine at one precision on one model and device. For a case, every contestant's
worker is started and its model loaded first; then the warm-up, timed and breakdown calls go out one
at a time, in rounds: round r starts with contestant r mod n and goes on in the contestants' order
(`rotation`). Each engine is thus first (and last) equally often, and each round's calls fall into
one stretch of time, so that a ratio of two engines' calls from the same round compares them under
the same load from other processes (bench/ratios.py).

A contestant that fails (its model does not load, a call raises, its worker dies or hangs) becomes a
failed record for the case, with the reason; the others go on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.measure import latency_stats
from bench.pool import WorkerFailed, WorkerProcess
from bench.sources import ModelSource

SETTLE_S = 0.2  # pause after each call: a thread pool that spins on after its run must not take a core from the next
CASE_FIELDS = ("num_beams", "batch_size", "src_len", "new_tokens")


@dataclass(frozen=True)
class Contestant:
    engine: str  # a name of bench.engines.ENGINES
    precision: str  # "fp32", "int8", "fp16"
    device: str  # "cpu" or "cuda"
    source: ModelSource
    artefact: Path  # what the engine's prepare() built for it

    @property
    def label(self) -> str:
        return f"{self.engine} {self.device} {self.precision} {self.source.name}"


@dataclass
class Slot:
    """A contestant with its worker process (None once stopped) and what its loading reported."""

    contestant: Contestant
    process: Any = None  # a WorkerProcess (anything with .call(op, **fields) and .close())
    load_s: float | None = None
    has_sessions: bool = False  # the engine runs onnxruntime sessions (--breakdown applies)
    failure: str | None = None  # why it takes no more calls (load failed, worker gone)
    traceback: str | None = None


def rotation(count: int, round_index: int) -> list[int]:
    """The contestants' order in round `round_index`: [r mod n, r mod n + 1, ...], wrapping around."""
    start = round_index % count
    return [(start + offset) % count for offset in range(count)]


def run_cases(contestants: list[Contestant], cases: list[dict[str, Any]], settings: dict[str, Any],
              tokens_dir: Path, log_dir: Path, calls: str = "time", call_fields: dict[str, Any] | None = None,
              say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Every case on every contestant (all of one model and device): a record per case x contestant.

    Fresh workers per case, or (settings["one_process"]) one set of workers for all the cases.
    calls, call_fields: what each round asks for (see `run_case`).
    """
    records: list[dict[str, Any]] = []
    groups = [cases] if settings["one_process"] else [[case] for case in cases]
    for group in groups:
        suffix = "" if settings["one_process"] else f"-{group[0]['id']}"
        slots = start(contestants, settings, tokens_dir, log_dir, suffix, say)
        try:
            for case in group:
                say(f"case {contestants[0].source.name} {contestants[0].device} {case['id']}: "
                    f"{', '.join(f'{c.engine} {c.precision}' for c in contestants)}, interleaved ...")
                records += run_case(slots, case, settings, calls, call_fields, say=say)
        finally:
            stop(slots)
    return records


def start(contestants: list[Contestant], settings: dict[str, Any], tokens_dir: Path, log_dir: Path,
          suffix: str = "", say: Callable[[str], None] = print) -> list[Slot]:
    """One worker per contestant, all loading at once (nothing is timed meanwhile; each peak-RSS window
    starts with its worker's first timed call)."""
    slots = []
    for contestant in contestants:
        name = "-".join((contestant.source.name.replace("/", "_"), contestant.engine, contestant.device,
                         contestant.precision)) + suffix
        slot = Slot(contestant, WorkerProcess(settings["threads"], log_dir / f"{name}.log"))
        try:
            slot.process.send("load", engine=contestant.engine, artefact=str(contestant.artefact),
                              device=contestant.device, precision=contestant.precision, threads=settings["threads"],
                              seed=settings["seed"], tokens_dir=str(tokens_dir), source=_source_dict(contestant.source))
        except WorkerFailed as err:
            slot.failure = f"loading failed: {err}"
        slots.append(slot)
    for slot in slots:
        if slot.failure:
            continue
        try:
            loaded = slot.process.receive()
            slot.load_s, slot.has_sessions = loaded["load_s"], loaded["has_sessions"]
        except WorkerFailed as err:
            slot.failure, slot.traceback = f"loading failed: {err}", err.traceback
            say(f"  {slot.contestant.label}: {slot.failure}")
    return slots


def stop(slots: list[Slot]) -> None:
    """End every worker: all are told at once, then each is waited for."""
    for slot in slots:
        if slot.process is not None:
            slot.process.end_input()
    for slot in slots:
        if slot.process is not None:
            slot.process.close()
            slot.process = None


def run_case(slots: list[Slot], case: dict[str, Any], settings: dict[str, Any], calls: str = "time",
             call_fields: dict[str, Any] | None = None, say: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One case on the slots' workers, interleaved (see the module docstring); a record per slot.

    calls: "time": settings["repeats"] rounds of timed calls, then as many of breakdown calls if
    settings["breakdown"], then each worker's "finish"; "breakdown" or "steps" (--step-cost): only
    settings["repeats"] rounds of that request (bench/worker.py), with call_fields, and no finish.
    Warm-up calls (settings["warmup"] rounds) come first either way.

    Record fields: model, engine, device, precision, length_rule, the case's num_beams, batch_size,
    src_len, new_tokens, status ("ok" | "failed"), and when ok: load_s; with calls="time":
    latencies_ms (round by round), positions (the contestant's place in each round's rotation, 0 =
    first), median_ms, p10_ms, p90_ms, min_ms, max_ms, tokens_per_s, peak_rss_mb, rss_scope,
    peak_gpu_mb, gpu_scope, generated_tokens, tokens_file; breakdown_calls (bench/breakdown.split_call
    of each) when breakdown calls ran; step_calls (the "steps" replies) with calls="steps". When
    failed: note (why) and traceback.
    """
    failed: dict[int, tuple[str, str | None]] = {i: (s.failure, s.traceback) for i, s in enumerate(slots) if s.failure}

    def each(op: str, rounds: int, wanted: Callable[[Slot], bool] = lambda slot: True, **fields: Any
             ) -> tuple[dict[int, list[dict[str, Any]]], dict[int, list[int]]]:
        replies: dict[int, list[dict[str, Any]]] = {i: [] for i in range(len(slots))}
        positions: dict[int, list[int]] = {i: [] for i in range(len(slots))}
        for round_index in range(rounds):
            for position, i in enumerate(rotation(len(slots), round_index)):
                if i in failed or not wanted(slots[i]):
                    continue
                try:
                    replies[i].append(slots[i].process.call(op, **fields))
                except WorkerFailed as err:
                    failed[i] = (f"{op} failed: {err}", err.traceback)
                    if not err.alive:
                        slots[i].failure = f"worker gone since case {case['id']}: {err}"
                    say(f"  {slots[i].contestant.label} {case['id']}: FAILED: {err}")
                    continue
                positions[i].append(position)
                if op != "case":
                    time.sleep(SETTLE_S)
        return replies, positions

    each("case", 1, case=case)
    for _ in range(settings["warmup"]):
        each("warmup", 1)
    timed = calls == "time"
    times, positions = each("time", settings["repeats"]) if timed else ({}, {})
    breakdowns, _ = (each("breakdown", settings["repeats"], lambda slot: slot.has_sessions, **(call_fields or {}))
                     if (timed and settings["breakdown"]) or calls == "breakdown" else ({}, {}))
    steps, _ = each("steps", settings["repeats"], **(call_fields or {})) if calls == "steps" else ({}, {})
    finished, _ = each("finish", 1) if timed else ({}, {})

    records = []
    for i, slot in enumerate(slots):
        c = slot.contestant
        record: dict[str, Any] = dict(model=c.source.name, engine=c.engine, device=c.device, precision=c.precision,
                                      length_rule=c.source.length_rule, **{k: case[k] for k in CASE_FIELDS})
        if i in failed:
            note, traceback = failed[i]
            record.update(status="failed", note=note, traceback=traceback)
        else:
            record.update(status="ok", load_s=slot.load_s, **(finished[i][0] if timed else {}))
            if timed:
                latencies = [reply["ms"] for reply in times[i]]
                record.update(latencies_ms=latencies, positions=positions[i],
                              **latency_stats([ms / 1000 for ms in latencies]))
                record["tokens_per_s"] = record["generated_tokens"] / (record["median_ms"] / 1000)
            if breakdowns.get(i):
                record["breakdown_calls"] = [reply["call"] for reply in breakdowns[i]]
            if steps.get(i):
                record["step_calls"] = [reply["step_ms"] for reply in steps[i]]
            say(f"  {c.label} {case['id']}: " + (f"median {record['median_ms']:.1f} ms" if timed else "done"))
        records.append(record)
    return records


def _source_dict(source: ModelSource) -> dict[str, Any]:
    fields = asdict(source)
    for name in ("checkpoint", "export_dir"):
        fields[name] = str(fields[name]) if fields[name] else None
    return fields
