"""s2s-bench: the s2s runtime against eager PyTorch, optimum and CTranslate2, on the same work.

Every engine's model files are built first (bench/engines). Then, for every model x device x case,
one worker process per engine x precision loads its model and the timed calls go to them in turn,
call by call, the order rotating each round (bench/compare.py), so every ratio of two engines comes
from one stretch of time on a machine whose load drifts. The parent collects latencies, peak memory
and the tokens, compares every engine's tokens with eager PyTorch's, computes the paired ratios
(bench/ratios.py), the per-step cost at two past lengths (--step-cost, bench/step_cost.py) and int8
accuracy on the demo model (--accuracy, bench/accuracy.py), judges the goals of issue 10
(bench/goals.py), and writes the table, results.json and the charts (bench/report.py).
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import click
import numpy as np

from bench import goals, ratios, report
from bench.breakdown import summarize
from bench.compare import Contestant, run_cases
from bench.engines import BASELINE, ENGINES, PRECISIONS, engine
from bench.measure import cpu_snapshot, others_cpu_share
from bench.sources import DEMO_DIR, ModelSource, export_manifest, resolve
from bench.step_cost import REQUEST as STEP_REQUEST, STEP_COST_NEW_TOKENS, analyze
from runtime.clickutil import S2SCommand
from runtime.errors import InvalidOptionError, S2SError, first_line

# Each preset fills the options not given on the command line.
PRESETS: dict[str, dict[str, Any]] = {
    "quick": dict(models=("t5-small",), num_beams=(1,), batch_sizes=(1,), src_lens=(32,), precisions=("fp32",),
                  warmup=1, repeats=3),
    "default": dict(models=("t5-small", "bart-base", "demo"), num_beams=(1, 4), batch_sizes=(1, 8, 32),
                    src_lens=(32,), precisions=("fp32", "int8"), warmup=1, repeats=3),
    "full": dict(models=("t5-small", "bart-base", "demo"), num_beams=(1, 4), batch_sizes=(1, 8, 32),
                 src_lens=(32, 128), precisions=PRECISIONS, warmup=2, repeats=5),
}

EPILOG = """\b
Examples:
  s2s-bench --quick                               t5-small shape, greedy, batch 1: a few minutes
  s2s-bench --quick --breakdown                   ... plus where the s2s loop spends its time
  s2s-bench                                       t5-small, bart-base, demo: greedy and beam 4,
                                                  batch 1/8/32, fp32 and int8
  s2s-bench --breakdown --step-cost --accuracy --baseline old/results.json
                                                  ... every goal of issue 10 judged in one run
  s2s-bench --full                                the whole matrix (t5-small, bart-base, demo): hours on 2 cores
  s2s-bench --model out/my-export --engine s2s    any export directory or checkpoint
  s2s-bench --quick --engine s2s,optimum --threads 4 --repeats 10
"""


def _int_list(ctx, param, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        values = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like 1,8,32, got {value!r}") from None
    if not values or min(values) < 1:
        raise click.BadParameter(f"expected integers >= 1, got {value!r}")
    return values


def _choice_list(choices: tuple[str, ...]):
    def parse(ctx, param, value: str | None) -> tuple[str, ...] | None:
        if value is None:
            return None
        values = tuple(v.strip() for v in value.split(",") if v.strip())
        unknown = [v for v in values if v not in choices]
        if unknown or not values:
            raise click.BadParameter(f"{', '.join(unknown) or value!r}: choose from {', '.join(choices)}")
        return values
    return parse


@click.command(cls=S2SCommand, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", "preset", flag_value="quick", help="Smallest run: t5-small shape, greedy, batch 1, 32 source "
              "tokens, fp32, 3 timed calls.")
@click.option("--full", "preset", flag_value="full", help="Every model, greedy and beam 4, batch 1/8/32, source "
              "32/128, fp32/int8/fp16, 5 timed calls. Takes hours on a small CPU.")
@click.option("--model", "models", multiple=True, metavar="NAME|DIR",
              help="A built-in shape (t5-small, bart-base, tiny-t5), 'demo' (models/demo), or a directory: "
                   "a transformers checkpoint, a models/ checkpoint, an s2s-export or optimum-cli export. Repeatable.")
@click.option("--engine", "engines", callback=_choice_list(tuple(ENGINES)), metavar="LIST",
              help=f"Engines to compare, comma-separated: {', '.join(ENGINES)} (default: all; missing ones "
                   "are skipped with a note).")
@click.option("--device", "devices", callback=_choice_list(("cpu", "cuda")), metavar="LIST",
              help="cpu, cuda or both (default: cpu, plus cuda where a GPU and a CUDA provider are present).")
@click.option("--precision", "precisions", callback=_choice_list(PRECISIONS), metavar="LIST",
              help="fp32, int8, fp16; each engine runs those it supports on the device (int8 on CPU, fp16 on CUDA).")
@click.option("--num-beams", callback=_int_list, metavar="LIST", help="1 = greedy; e.g. 1,4.")
@click.option("--batch-size", "batch_sizes", callback=_int_list, metavar="LIST", help="e.g. 1,8,32.")
@click.option("--src-len", "src_lens", callback=_int_list, metavar="LIST", help="Source tokens per input, e.g. 32,128.")
@click.option("--new-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Tokens generated per sequence; min = max, so every engine does exactly this much work "
                   "(models/ checkpoints: at most this many, each row stopping at EOS).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads for every engine (torch, onnxruntime, CTranslate2). Default: the cores "
                   "this process may use.")
@click.option("--warmup", type=click.IntRange(min=0), default=None, help="Untimed calls per engine before timing "
              "(per case).")
@click.option("--repeats", type=click.IntRange(min=1), default=None,
              help="Timed calls per engine per case: rounds of one call to every engine, the order rotating.")
@click.option("--breakdown", is_flag=True, help="Also time inside vs outside onnxruntime's session.run, per "
              "decoding step (engines with onnxruntime sessions: s2s, optimum); as many calls as --repeats.")
@click.option("--step-cost", is_flag=True, help=f"Also time one s2s decoding step at past length 16 and 512 "
              f"(batch 1, each --num-beams, {STEP_COST_NEW_TOKENS} new tokens).")
@click.option("--accuracy", is_flag=True, help="Also score s2s at each CPU precision (fp32, int8) on the demo "
              "model's held-out instructions: exact match, greedy and beam 4.")
@click.option("--baseline", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              metavar="RESULTS.json", help="An earlier run's results.json: judge s2s peak RSS against it.")
@click.option("--optimize", is_flag=True, help="Export s2s models with s2s-export --optimize (graph fusions).")
@click.option("--one-process", is_flag=True, help="One set of worker processes per model for all its cases "
              "(faster start-up); peak RSS is then reset per case but memory an earlier case left allocated "
              "still counts.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-results"),
              show_default=True, help="Where results.json, table.md, chart.png (and breakdown.png) go.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Built checkpoints, exports and conversions, reused across runs. Default: ~/.cache/s2s-bench.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights and inputs.")
def main(preset: str | None, models: tuple[str, ...], engines: tuple[str, ...] | None, devices: tuple[str, ...] | None,
         precisions: tuple[str, ...] | None, num_beams: tuple[int, ...] | None, batch_sizes: tuple[int, ...] | None,
         src_lens: tuple[int, ...] | None, new_tokens: int, threads: int | None, warmup: int | None,
         repeats: int | None, breakdown: bool, step_cost: bool, accuracy: bool, baseline: Path | None,
         optimize: bool, one_process: bool, out_dir: Path, cache_dir: Path | None, seed: int) -> None:
    """Measure generation speed of the s2s runtime against eager PyTorch (and optimum, CTranslate2).

    Every engine gets the same inputs, the same number of new tokens and the same thread count. For
    each case, every engine x precision runs in its own process, loaded once, and the timed calls
    are interleaved call by call, the order rotating each round. The report gives median and p10-p90
    latency, generated tokens per second, speedups over eager PyTorch and (paired) over the faster
    of optimum and CTranslate2, peak RSS (and GPU memory on CUDA), whether each engine produced the
    same tokens as eager PyTorch, and the goals of issue 10 with pass, fail or not measured.
    """
    chosen = PRESETS[preset or "default"]
    settings = {
        "preset": preset or "default",
        "models": list(models or chosen["models"]),
        "engines": list(engines or ENGINES),
        "devices": list(devices or _default_devices()),
        "precisions": list(precisions or chosen["precisions"]),
        "num_beams": list(num_beams or chosen["num_beams"]),
        "batch_sizes": list(batch_sizes or chosen["batch_sizes"]),
        "src_lens": list(src_lens or chosen["src_lens"]),
        "new_tokens": new_tokens,
        "threads": threads or len(os.sched_getaffinity(0)),
        "warmup": chosen["warmup"] if warmup is None else warmup,
        "repeats": repeats or chosen["repeats"],
        "breakdown": breakdown,
        "step_cost": step_cost,
        "accuracy": accuracy,
        "optimize": optimize,
        "one_process": one_process,
        "seed": seed,
    }
    baseline_rss = _read_baseline(baseline) if baseline else None  # before hours of measuring, not after
    cache_dir = cache_dir or default_cache_dir()
    notes: list[dict[str, str]] = []
    if not models and "demo" in settings["models"] and not DEMO_DIR.is_dir():
        # A preset names the demo model, which only a repository checkout has: skip it with a note. A
        # model named with --model is resolved below, and an error there stops the run.
        settings["models"].remove("demo")
        notes.append({"model": "demo", "engine": "*", "device": "*", "precision": "*",
                      "reason": f"not found in {DEMO_DIR} (train it with `s2s-train -o models/demo --threads 1`)"})
    sources = [resolve(spec, cache_dir, seed) for spec in settings["models"]]
    results = run(settings, sources, cache_dir, out_dir, notes)
    results["baseline"] = baseline_rss
    results["goals"] = goals.judge(results)
    report.print_report(results)
    written = report.write_all(results, out_dir)
    click.echo("\nwrote " + ", ".join(str(p) for p in written), err=True)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "s2s-bench"


def _default_devices() -> tuple[str, ...]:
    """cpu, plus cuda where a GPU driver is loaded and onnxruntime has a CUDA provider."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return ("cpu",)
    try:
        ctypes.CDLL("libcuda.so.1")  # the driver: present only on a machine with an NVIDIA GPU
    except OSError:
        return ("cpu",)
    return ("cpu", "cuda")


def _read_baseline(path: Path) -> dict[str, Any]:
    """The s2s CPU peak RSS of every case of an earlier run's results.json (either schema version).

    Raises:
        InvalidOptionError: the file is not an s2s-bench results.json.
    """
    try:
        earlier = json.loads(path.read_text(encoding="utf-8"))
        records = [{k: r[k] for k in ("model", "precision", "num_beams", "batch_size", "src_len", "new_tokens",
                                      "peak_rss_mb")}
                   for r in earlier["results"] if r["engine"] == "s2s" and r["device"] == "cpu" and r["status"] == "ok"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        why = f"no field {err}" if isinstance(err, KeyError) else first_line(err)
        raise InvalidOptionError(f"--baseline {str(path)!r}: not an s2s-bench results.json ({why})") from None
    return {"file": str(path), "records": records}


def _cases(settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The work matrix, smallest work first."""
    cases = [dict(id=f"beams{b}-batch{n}-src{s}", num_beams=b, batch_size=n, src_len=s,
                  new_tokens=settings["new_tokens"])
             for b, n, s in itertools.product(settings["num_beams"], settings["batch_sizes"], settings["src_lens"])]
    return sorted(cases, key=lambda c: c["num_beams"] * c["batch_size"] * c["src_len"])


def run(settings: dict[str, Any], sources: list[ModelSource], cache_dir: Path, out_dir: Path,
        notes: list[dict[str, str]]) -> dict[str, Any]:
    """Run the whole matrix; returns the report dict that results.json holds (`notes` grows with skips)."""
    started = time.time()
    tokens_dir, log_dir = out_dir / "tokens", out_dir / "logs"
    for folder in (tokens_dir, log_dir):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    if settings["accuracy"]:
        import bench.accuracy  # noqa: F401 - imports models/ before onnxruntime.quantization can shadow it (see _plan)
    # Everything is built before anything is timed: an export's CPU burst never overlaps a measurement.
    groups = _plan(settings, sources, cache_dir, notes)
    cpu_before = cpu_snapshot()  # from here on, only measurements run
    records, step_costs = [], []
    for contestants in groups:
        records += run_cases(contestants, _cases(settings), settings, tokens_dir, log_dir, say=_say)
    for contestants in groups if settings["step_cost"] else ():
        step_costs += _step_cost(contestants, settings, tokens_dir, log_dir, notes)
    others_share = others_cpu_share(cpu_before, cpu_snapshot())
    for record in records:
        calls = record.pop("breakdown_calls", None)
        if calls:
            record["breakdown"] = summarize(calls)
    _compare_with_eager(records)
    paired = ratios.compute(records)
    for entry in paired:
        if entry["kind"] == "vs_best_peer":
            mine = next(r for r in records if r["status"] == "ok" and r["engine"] == ratios.SUBJECT
                        and ratios.case_key(r) == ratios.case_key(entry) and r["precision"] == entry["precision"])
            mine["speedup_vs_best_peer"] = entry["value"]
    accuracy = _accuracy(cache_dir, settings["threads"]) if settings["accuracy"] else None
    return {
        "schema_version": report.SCHEMA_VERSION,
        "tool": "s2s-bench",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "duration_s": round(time.time() - started, 1),
        "command": " ".join(["s2s-bench", *sys.argv[1:]]),
        "machine": report.machine_info(others_share),
        "versions": report.package_versions(),
        "settings": settings,
        "results": records,
        "notes": notes,
        "ratios": paired,
        "step_cost": step_costs,
        "accuracy": accuracy,
    }


def _plan(settings: dict[str, Any], sources: list[ModelSource], cache_dir: Path,
          notes: list[dict[str, str]]) -> list[list[Contestant]]:
    """Prepare every engine's model files; return the contestants, one group per model x device."""
    from exporter.quiet import library_output_captured  # imports transformers: not at --help time

    if any(source.checkpoint_format == "models" for source in sources):
        # Importing onnxruntime.quantization (int8 exports) appends site-packages/onnxruntime/transformers
        # to sys.path, and its models/ folder then shadows this project's `models` package for any
        # later first import of it (the demo's export): import ours before that can happen.
        import models  # noqa: F401

    groups = []
    for source, device in itertools.product(sources, settings["devices"]):
        group = []
        for name in settings["engines"]:
            module = engine(name)
            why_not = module.unavailable(device)
            if why_not:
                notes.append(_note(source, name, device, "*", why_not))
                _say(f"skip {name} on {device}: {why_not}")
                continue
            for precision in settings["precisions"]:
                if precision not in module.precisions(device):
                    continue
                try:
                    _say(f"prepare {name} {precision} for {source.name} ...")
                    extra = {"optimize": settings["optimize"]} if name == "s2s" else {}
                    with library_output_captured():  # tracer warnings and exporter advice, not for this report
                        artefact = module.prepare(source, precision, device, cache_dir, **extra)
                except LookupError as err:
                    notes.append(_note(source, name, device, precision, str(err)))
                    _say(f"skip {name} {precision}: {err}")
                    continue
                except Exception as err:  # noqa: BLE001 - one engine failing to build must not stop the others
                    if not isinstance(err, S2SError):
                        traceback.print_exc()
                    notes.append(_note(source, name, device, precision, f"preparing failed: {first_line(err)}"))
                    _say(f"skip {name} {precision}: {first_line(err)}")
                    continue
                group.append(Contestant(name, precision, device, source, Path(artefact)))
        if group:
            groups.append(group)
    return groups


def _step_cost(contestants: list[Contestant], settings: dict[str, Any], tokens_dir: Path, log_dir: Path,
               notes: list[dict[str, str]]) -> list[dict[str, Any]]:
    """--step-cost on the group's s2s contestants (batch 1, each --num-beams), precisions interleaved;
    a case's failures become notes."""
    mine = [c for c in contestants if c.engine == ratios.SUBJECT]
    if not mine:
        return []
    source, device = mine[0].source, mine[0].device
    why_not = None
    if source.length_rule != "min_new_tokens":
        why_not = "rows stop at EOS on this model (no min_new_tokens), so no call reaches past 512"
    limits = [export_manifest(c.artefact).max_target_positions for c in mine]
    if any(limit is not None and limit < 1 + STEP_COST_NEW_TOKENS for limit in limits):
        why_not = f"the decoder holds at most {min(x for x in limits if x is not None)} positions, " \
                  f"{1 + STEP_COST_NEW_TOKENS} needed"
    if why_not:
        notes.append(_note(source, "s2s", device, "*", f"step cost: {why_not}"))
        return []
    src_len = settings["src_lens"][0]
    entries = []
    for beams in settings["num_beams"]:
        case = dict(id=f"steps-beams{beams}-batch1-src{src_len}", num_beams=beams, batch_size=1, src_len=src_len,
                    new_tokens=STEP_COST_NEW_TOKENS)
        # greedy streams, so its steps at both past lengths are timed side by side; beam search cannot
        calls = ("steps", STEP_REQUEST) if beams == 1 else ("breakdown", None)
        for record in run_cases(mine, [case], settings, tokens_dir, log_dir, *calls, say=_say):
            if record["status"] != "ok":
                notes.append(_note(source, "s2s", device, record["precision"], f"step cost failed: {record['note']}"))
                continue
            entries.append(analyze(record))
    return entries


def _accuracy(cache_dir: Path, threads: int) -> dict[str, Any]:
    from bench.accuracy import measure

    try:
        return measure(cache_dir, threads, say=_say)
    except S2SError as err:
        return {"error": str(err)}


def _compare_with_eager(records: list[dict[str, Any]]) -> None:
    """Speedup over eager PyTorch fp32 and token agreement with it, case by case on the same model.

    Speedup compares with eager on the same device; tokens compare with eager on the CPU when it ran
    (the most exact reference), else on the same device.
    """
    def key(r: dict[str, Any]) -> tuple:
        return r["model"], r["num_beams"], r["batch_size"], r["src_len"], r["new_tokens"]

    eager = {(key(r), r["device"]): r for r in records
             if r["engine"] == BASELINE and r["precision"] == "fp32" and r["status"] == "ok"}
    for record in records:
        record.setdefault("speedup_vs_eager", None)
        record.setdefault("identical_to_eager", None)
        record.setdefault("token_match", None)
        if record["status"] != "ok":
            continue
        same_device = eager.get((key(record), record["device"]))
        if same_device is not None:
            record["speedup_vs_eager"] = same_device["median_ms"] / record["median_ms"]
        reference = eager.get((key(record), "cpu")) or same_device
        if reference is not None:
            expected, produced = np.load(reference["tokens_file"]), np.load(record["tokens_file"])
            record["identical_to_eager"] = bool(np.array_equal(expected, produced))
            record["token_match"] = _token_match(expected, produced)


def _token_match(expected: np.ndarray, produced: np.ndarray) -> float:
    """Share of token positions that agree; [batch, len] int64 each, the shorter counted as unequal past its end."""
    if expected.shape[0] != produced.shape[0]:
        return 0.0
    width = max(expected.shape[1], produced.shape[1])
    padded = [np.pad(t, ((0, 0), (0, width - t.shape[1])), constant_values=-1) for t in (expected, produced)]
    return float((padded[0] == padded[1]).mean())


def _note(source: ModelSource, name: str, device: str, precision: str, reason: str) -> dict[str, str]:
    return {"model": source.name, "engine": name, "device": device, "precision": precision, "reason": reason}


def _say(message: str) -> None:
    click.echo(message, err=True)


if __name__ == "__main__":
    main()
