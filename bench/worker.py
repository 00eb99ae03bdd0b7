"""One measured process: it loads one engine at one precision once, then runs generate calls on request.

    python -m bench.worker        (started by bench/pool.py; speaks JSON lines on stdin / stdout)

A process per engine x precision keeps engines apart (torch's and onnxruntime's allocators and thread
pools do not meet) and makes peak RSS that engine's own. The parent holds one such process per
contestant of a case and sends them calls one at a time, interleaved (bench/compare.py), so only one
worker computes at any moment.

The protocol, one JSON object per line; every request gets exactly one reply line:
    {"op": "load", "engine", "artefact", "device", "precision", "threads", "seed", "tokens_dir",
     "source": {ModelSource fields}}           -> {"load_s", "has_sessions"}          (first request)
    {"op": "case", "case": {"id", "num_beams", "batch_size", "src_len", "new_tokens"}} -> {}
        the inputs of a case (bench/sources.py); the following calls generate on them
    {"op": "warmup"}                            -> {}             one untimed call
    {"op": "time"}                              -> {"ms"}         one timed call; the first of a case
                                                                   starts its peak-RSS window
    {"op": "finish"}                            -> {"peak_rss_mb", "rss_scope", "peak_gpu_mb", "gpu_scope",
                                                    "generated_tokens", "tokens_file"}
        saves the last call's tokens ([batch, 1 + generated] int64) to tokens_dir; without a timed call
        in the case the peak RSS is the whole process's
    {"op": "breakdown"}                         -> {"call": breakdown.split_call(...)}
        one call with every session.run recorded (engines with onnxruntime sessions only)
    {"op": "steps", "pasts": [16, 512], "half_window": 4}
                                                -> {"step_ms": {"16": [...], "512": [...]}}
        greedy steps timed one by one (engines with a `stream` method: s2s): one stream per past
        length, each advanced to past - half_window, then stepped in turn, the order alternating, over
        2 * half_window + 1 steps; item j of every list comes from the same turn
A request that fails is answered {"error": "Type: first line", "traceback"} and the worker goes on
(a case running out of memory must not hide the next). End of input ends the worker (status 0).

Libraries print to stdout (warnings, progress): the worker moves file descriptor 1 onto stderr at
start and keeps the protocol on a private copy of the original stdout.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import IO, Any

import numpy as np

from bench import breakdown, measure
from bench.engines import engine
from bench.sources import ModelSource
from runtime.errors import first_line


class Worker:
    """The state of one worker process: its loaded engine and the current case's inputs."""

    def __init__(self) -> None:
        self.job: dict[str, Any] = {}
        self.runner = None
        self.source: ModelSource | None = None
        self.case: dict[str, Any] = {}
        self.inputs: tuple[np.ndarray, np.ndarray] | None = None  # input_ids, attention_mask: [batch, src_len] int64
        self.tokens: np.ndarray | None = None  # the last call's output
        self.rss_scope: str | None = None  # set by the case's first timed call, which starts the peak-RSS window
        self.gpu_before: float | None = None  # device memory in use before the engine loaded (CUDA)

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        op = request.get("op")
        handler = getattr(self, f"_op_{op}", None)
        if handler is None:
            raise ValueError(f"unknown request {op!r}")
        if op != "load" and self.runner is None:
            raise RuntimeError(f"{op!r} before a successful 'load'")
        return handler(request)

    def _op_load(self, request: dict[str, Any]) -> dict[str, Any]:
        self.job = request
        fields = dict(request["source"])
        for name in ("checkpoint", "export_dir"):
            fields[name] = Path(fields[name]) if fields[name] else None
        self.source = ModelSource(**fields)
        if request["device"] == "cuda":
            self.gpu_before = measure.device_used_mb()
        started = time.perf_counter()
        self.runner = engine(request["engine"]).load(Path(request["artefact"]), self.source, request["device"],
                                                     request["precision"], request["threads"])
        return {"load_s": time.perf_counter() - started, "has_sessions": bool(self.runner.sessions())}

    def _op_case(self, request: dict[str, Any]) -> dict[str, Any]:
        self.case = request["case"]
        self.inputs = self.source.inputs(self.case["batch_size"], self.case["src_len"], self.job["seed"])
        self.tokens, self.rss_scope = None, None
        return {}

    def _generate(self) -> np.ndarray:
        if self.inputs is None:
            raise RuntimeError("a call before any 'case'")
        self.tokens = self.runner.generate(*self.inputs, num_beams=self.case["num_beams"],
                                           new_tokens=self.case["new_tokens"])
        return self.tokens

    def _op_warmup(self, request: dict[str, Any]) -> dict[str, Any]:
        self._generate()
        return {}

    def _op_time(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.rss_scope is None:
            self.rss_scope = "timed runs" if measure.reset_peak_rss() else "whole process"
        start = time.perf_counter()
        self._generate()
        return {"ms": (time.perf_counter() - start) * 1000}

    def _op_finish(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.tokens is None:
            raise RuntimeError("'finish' before any call of the case")
        out: dict[str, Any] = {"peak_rss_mb": measure.peak_rss_mb(), "rss_scope": self.rss_scope or "whole process",
                               "generated_tokens": generated_tokens(self.tokens, self.source, self.case["new_tokens"])}
        name = "-".join((self.source.name.replace("/", "_"), self.job["engine"], self.job["device"],
                         self.job["precision"], self.case["id"]))
        tokens_file = Path(self.job["tokens_dir"]) / f"{name}.npy"
        np.save(tokens_file, self.tokens)
        out["tokens_file"] = str(tokens_file)
        out["peak_gpu_mb"], out["gpu_scope"] = (measure.gpu_memory_mb(self.gpu_before)
                                                if self.job["device"] == "cuda" else (None, None))
        return out

    def _op_breakdown(self, request: dict[str, Any]) -> dict[str, Any]:
        sessions = self.runner.sessions()
        if not sessions:
            raise RuntimeError(f"{self.job['engine']} runs no onnxruntime sessions to break down")
        with breakdown.timed_sessions(sessions) as runs:
            start = time.perf_counter()
            self._generate()
            end = time.perf_counter()
        return {"call": breakdown.split_call(runs, start, end)}

    def _op_steps(self, request: dict[str, Any]) -> dict[str, Any]:
        if not hasattr(self.runner, "stream"):
            raise RuntimeError(f"{self.job['engine']} cannot generate step by step")
        if self.inputs is None:
            raise RuntimeError("'steps' before any 'case'")
        pasts, half = request["pasts"], request["half_window"]
        if min(pasts) < half or max(pasts) + half >= self.case["new_tokens"]:
            raise ValueError(f"pasts {pasts} +- {half} do not fit in {self.case['new_tokens']} new tokens")
        streams = [self.runner.stream(*self.inputs, new_tokens=self.case["new_tokens"]) for _ in pasts]
        try:
            for stream, past in zip(streams, pasts):
                for _ in range(past - half):  # the next next() then runs the decoder at past - half
                    next(stream)
            times: list[list[float]] = [[] for _ in pasts]
            for turn in range(2 * half + 1):
                order = range(len(pasts)) if turn % 2 == 0 else reversed(range(len(pasts)))
                for index in order:
                    start = time.perf_counter()
                    next(streams[index])
                    times[index].append((time.perf_counter() - start) * 1000)
        finally:
            for stream in streams:
                stream.close()
        return {"step_ms": {str(past): ms for past, ms in zip(pasts, times)}}


def generated_tokens(tokens: np.ndarray, source: ModelSource, new_tokens: int) -> int:
    """Tokens the call generated, over all rows: up to and including each row's EOS.

    tokens: [batch, 1 + generated] int64, start token first.

    Raises:
        RuntimeError: the engine did not do the work asked for (a length rule not honoured), which
            would make its timing incomparable.
    """
    batch, length = tokens.shape
    fixed = source.length_rule == "min_new_tokens"
    if (fixed and length != 1 + new_tokens) or not 1 < length <= 1 + new_tokens:
        raise RuntimeError(f"tokens of shape {tokens.shape} for {new_tokens} new tokens "
                           f"({'exactly' if fixed else 'at most'} {1 + new_tokens} columns expected)")
    if fixed:
        return batch * new_tokens
    body = tokens[:, 1:]
    is_eos = body == source.eos_token_id
    ends = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1) + 1, body.shape[1])  # EOS counts as generated
    return int(ends.sum())


def one_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {first_line(err, 400)}"


def serve(requests: IO[str], replies: IO[str]) -> None:
    """Answer requests line by line until end of input."""
    worker = Worker()
    for line in requests:
        if not line.strip():
            continue
        try:
            reply = worker.handle(json.loads(line))
        except Exception as err:  # noqa: BLE001 - any failure is this request's answer, not the worker's end
            reply = {"error": one_line(err), "traceback": traceback.format_exc(limit=8)}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


def main() -> None:
    replies = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # whatever a library prints goes to stderr, never into the protocol
    serve(sys.stdin, replies)


if __name__ == "__main__":
    main()
