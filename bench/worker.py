"""One measured process: load one engine's model, run the cases of a job, write the results.

    python -m bench.worker JOB.json RESULT.json

A fresh process per job keeps engines apart (torch's and onnxruntime's allocators and thread pools
do not meet) and makes peak RSS that engine's own. The parent (bench/cli.py) writes JOB.json:

    {"engine", "artefact", "device", "precision", "threads", "warmup", "repeats", "seed",
     "breakdown": bool, "tokens_dir", "source": {ModelSource fields},
     "cases": [{"id", "num_beams", "batch_size", "src_len", "new_tokens"}, ...]}

RESULT.json: {"load_s", "cases": [{"id", "latencies_ms", "median_ms", "p90_ms", ..., "generated_tokens",
"peak_rss_mb", "rss_scope", "peak_gpu_mb", "gpu_scope"?, "tokens_file", "breakdown_calls"?} or {"id", "error",
"traceback"}]}. A failure to load is written as {"error": "..."} and exit status 0: the parent
reports it on every case of the job, not as a crash.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from bench import breakdown, measure
from bench.engines import engine
from bench.sources import ModelSource


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    source_fields = dict(job["source"])
    for name in ("checkpoint", "export_dir"):
        source_fields[name] = Path(source_fields[name]) if source_fields[name] else None
    source = ModelSource(**source_fields)
    gpu_before = measure.device_used_mb() if job["device"] == "cuda" else None  # before the engine loads
    started = time.perf_counter()
    try:
        runner = engine(job["engine"]).load(Path(job["artefact"]), source, job["device"], job["precision"],
                                            job["threads"])
    except Exception as err:  # noqa: BLE001 - any load failure is this engine's note in the report
        return {"error": _one_line(err)}
    result: dict[str, Any] = {"load_s": time.perf_counter() - started, "cases": []}
    for case in job["cases"]:
        try:
            result["cases"].append(_run_case(runner, source, case, job, gpu_before))
        except Exception as err:  # noqa: BLE001 - one case failing (e.g. out of memory) must not hide the others
            result["cases"].append({"id": case["id"], "error": _one_line(err),
                                    "traceback": traceback.format_exc(limit=8)})
    return result


def _run_case(runner, source: ModelSource, case: dict[str, Any], job: dict[str, Any],
              gpu_before: float | None) -> dict[str, Any]:
    input_ids, attention_mask = source.inputs(case["batch_size"], case["src_len"], job["seed"])
    work = dict(num_beams=case["num_beams"], new_tokens=case["new_tokens"])
    for _ in range(job["warmup"]):
        runner.generate(input_ids, attention_mask, **work)
    rss_window = measure.reset_peak_rss()
    latencies = []
    for _ in range(job["repeats"]):
        start = time.perf_counter()
        tokens = runner.generate(input_ids, attention_mask, **work)
        latencies.append(time.perf_counter() - start)
    out: dict[str, Any] = {"id": case["id"], "latencies_ms": [s * 1000 for s in latencies],
                           **measure.latency_stats(latencies),
                           "peak_rss_mb": measure.peak_rss_mb(),
                           "rss_scope": "timed runs" if rss_window else "whole process"}
    out["generated_tokens"] = _generated_tokens(tokens, source, case["new_tokens"])
    name = "-".join((source.name.replace("/", "_"), job["engine"], job["device"], job["precision"], case["id"]))
    tokens_file = Path(job["tokens_dir"]) / f"{name}.npy"
    np.save(tokens_file, tokens)
    out["tokens_file"] = str(tokens_file)
    if job["device"] == "cuda":  # after the timed runs, so nvidia-smi never runs during one
        out["peak_gpu_mb"], out["gpu_scope"] = measure.gpu_memory_mb(gpu_before)
    else:
        out["peak_gpu_mb"] = None
    if job["breakdown"]:
        sessions = runner.sessions()
        if sessions:
            out["breakdown_calls"] = _breakdown_calls(runner, sessions, input_ids, attention_mask, work,
                                                      job["repeats"])
    return out


def _generated_tokens(tokens: np.ndarray, source: ModelSource, new_tokens: int) -> int:
    """Tokens the call generated, over all rows: up to and including each row's EOS.

    tokens: [batch, 1 + generated] int64, start token first. Raises when an engine did not do the
    work asked for (a length rule not honoured), which would make its timing incomparable.
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


def _breakdown_calls(runner, sessions: dict[str, Any], input_ids: np.ndarray, attention_mask: np.ndarray,
                     work: dict[str, int], repeats: int) -> list[dict[str, Any]]:
    """Time `repeats` more calls with every session run recorded (breakdown.split_call of each)."""
    calls = []
    for _ in range(repeats):
        with breakdown.timed_sessions(sessions) as runs:
            start = time.perf_counter()
            runner.generate(input_ids, attention_mask, **work)
            end = time.perf_counter()
        calls.append(breakdown.split_call(runs, start, end))
    return calls


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:400] if text else ''}"


def main() -> None:
    job_path, result_path = map(Path, sys.argv[1:3])
    result = run_job(json.loads(job_path.read_text(encoding="utf-8")))
    result_path.write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main()
