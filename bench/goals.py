"""The goals of issue 10, each judged from one run's results: pass, fail, or not measured.

A goal whose data the run does not hold (a case not in the matrix, --breakdown, --step-cost,
--accuracy or --baseline not given, an engine skipped) is "not measured", never passed. Speed goals
are judged on the CPU and on models every engine does the same work on (length rule
"min_new_tokens": the random-weight shapes and transformers checkpoints; see bench/sources.py).

`judge(results)` returns a list of {"goal", "where", "measured", "status"}; status is one of STATUSES.
"""

from __future__ import annotations

from typing import Any

from bench.ratios import SUBJECT, find

PASS, FAIL, NOT_MEASURED = "pass", "fail", "not measured"
STATUSES = (PASS, FAIL, NOT_MEASURED)

VS_PEER = 1.3  # s2s at least this many times faster than the faster of optimum and CTranslate2
PEER_CELLS = [(beams, batch, precision) for beams in (1, 4) for batch in (1, 8) for precision in ("fp32", "int8")]
INT8_VS_FP32 = 2.0  # s2s int8 over s2s fp32, greedy batch 1
ACCURACY_POINTS = 0.5  # int8 exact match within this many points of fp32 (demo model, held-out set)
OUTSIDE_PCT = {1: 3.0, 4: 5.0}  # most time outside session.run, % of wall time, by num_beams
STEP_RATIO = 1.15  # per-step cost at past 512 over past 16
SCALING_BATCH, SCALING = 32, 10.0  # greedy tokens/s at batch 32 at least 10x batch 1
RSS_TOLERANCE = 0.02  # peak RSS "no higher than the baseline": within 2% (allocator noise between runs)
GPU_VS_EAGER = 5.0  # s2s greedy batch 1 on CUDA over eager PyTorch on CUDA


def _line(goal: str, where: str, measured: str, status: str) -> dict[str, str]:
    return {"goal": goal, "where": where, "measured": measured, "status": status}


def _verdict(ok: bool) -> str:
    return PASS if ok else FAIL


def _search(num_beams: int) -> str:
    return "greedy" if num_beams == 1 else f"beam {num_beams}"


def _spread(entry: dict[str, Any]) -> str:
    if not entry["paired"]:
        return "ratio of medians"
    return f"p10-p90 {entry['p10']:.2f}-{entry['p90']:.2f}x, {entry['pairs']} paired calls"


def judge(results: dict[str, Any]) -> list[dict[str, str]]:
    records = results["results"]
    ratios = results.get("ratios") or []
    cpu = [r for r in records if r["device"] == "cpu"]
    speed_models = list(dict.fromkeys(r["model"] for r in cpu if r["length_rule"] == "min_new_tokens"))
    src_lens = {m: sorted({r["src_len"] for r in cpu if r["model"] == m}) for m in speed_models}
    where_models = [(m, s) for m in speed_models for s in src_lens[m]]
    lines: list[dict[str, str]] = []

    goal = f"s2s >= {VS_PEER}x the faster of optimum and ct2"
    for model, src in where_models:
        for beams, batch, precision in PEER_CELLS:
            where = f"{model} src {src}, {_search(beams)}, batch {batch}, {precision}"
            entry = find(ratios, "vs_best_peer", model=model, device="cpu", num_beams=beams, batch_size=batch,
                         src_len=src, precision=precision)
            if entry is None:
                lines.append(_line(goal, where, "no s2s and peer timings of this case", NOT_MEASURED))
            else:
                lines.append(_line(goal, where, f"{entry['value']:.2f}x vs {entry['against']} ({_spread(entry)})",
                                   _verdict(entry["value"] >= VS_PEER)))
    if not where_models:
        lines.append(_line(goal, "-", "no model the peers run", NOT_MEASURED))

    goal = f"s2s int8 >= {INT8_VS_FP32}x s2s fp32, greedy batch 1"
    for model, src in where_models or [("-", None)]:
        entry = find(ratios, "vs_fp32", model=model, device="cpu", num_beams=1, batch_size=1, src_len=src,
                     precision="int8")
        where = f"{model} src {src}" if src else model
        lines.append(_line(goal, where, "no int8 and fp32 timings of greedy batch 1", NOT_MEASURED) if entry is None
                     else _line(goal, where, f"{entry['value']:.2f}x ({_spread(entry)})",
                                _verdict(entry["value"] >= INT8_VS_FP32)))

    lines += _accuracy_lines(results.get("accuracy"))

    for beams, limit in OUTSIDE_PCT.items():
        goal = f"time outside session.run <= {limit:g}% ({_search(beams)})"
        for model in speed_models or ["-"]:
            broken_down = [r for r in cpu if r["model"] == model and r["engine"] == SUBJECT
                           and r["num_beams"] == beams and r.get("breakdown")]
            if not broken_down:
                lines.append(_line(goal, model, "no s2s breakdown of this search (run with --breakdown)", NOT_MEASURED))
                continue
            worst = max(broken_down, key=lambda r: r["breakdown"]["outside_pct"])
            lines.append(_line(goal, f"{model}, worst of {len(broken_down)} case(s)",
                               f"{worst['breakdown']['outside_pct']:.1f}% at batch {worst['batch_size']} "
                               f"src {worst['src_len']} {worst['precision']}",
                               _verdict(worst["breakdown"]["outside_pct"] <= limit)))

    goal = f"per-step cost at past 512 <= {STEP_RATIO}x past 16"
    entries = results.get("step_cost") or []
    for entry in entries:
        where = f"{entry['model']} {_search(entry['num_beams'])} batch {entry['batch_size']} {entry['precision']}"
        lines.append(_line(goal, where, f"{entry['ratio']:.2f}x ({entry['step_ms']['16']:.2f} -> "
                                        f"{entry['step_ms']['512']:.2f} ms a step; p10-p90 {entry['ratio_p10']:.2f}-"
                                        f"{entry['ratio_p90']:.2f}x, {entry['method']}, {entry['calls']} calls)",
                           _verdict(entry["ratio"] <= STEP_RATIO)))
    if not entries:
        lines.append(_line(goal, "-", "run with --step-cost", NOT_MEASURED))

    goal = f"greedy tokens/s at batch {SCALING_BATCH} >= {SCALING:g}x batch 1"
    precisions = list(dict.fromkeys(r["precision"] for r in cpu if r["engine"] == SUBJECT)) or ["fp32"]
    for model, src in where_models or [("-", None)]:
        for precision in precisions:
            entry = find(ratios, "batch_scaling", model=model, device="cpu", num_beams=1, batch_size=SCALING_BATCH,
                         src_len=src, precision=precision)
            where = f"{model} src {src}, s2s {precision}" if src else model
            lines.append(_line(goal, where, f"no greedy batch 1 and {SCALING_BATCH} timings", NOT_MEASURED)
                         if entry is None else
                         _line(goal, where, f"{entry['value']:.1f}x ({_spread(entry)})",
                               _verdict(entry["value"] >= SCALING)))

    lines += _rss_lines(cpu, speed_models, results.get("baseline"))

    goal = "s2s fp32 tokens identical to eager PyTorch"
    compared = [r for r in records if r["engine"] == SUBJECT and r["precision"] == "fp32"
                and r["status"] == "ok" and r.get("identical_to_eager") is not None]
    differing = [r for r in compared if not r["identical_to_eager"]]
    lines.append(_line(goal, f"{len(compared)} case(s)", "no eager comparison" if not compared else
                       ("all identical" if not differing else
                        f"{len(differing)} differ, e.g. {differing[0]['model']} {_search(differing[0]['num_beams'])} "
                        f"batch {differing[0]['batch_size']}"),
                       NOT_MEASURED if not compared else _verdict(not differing)))

    goal = f"GPU: s2s greedy batch 1 >= {GPU_VS_EAGER:g}x eager PyTorch on CUDA"
    gpu = [e for e in ratios if e["kind"] == "vs_eager" and e["device"] == "cuda" and e["num_beams"] == 1
           and e["batch_size"] == 1]
    for entry in gpu:
        lines.append(_line(goal, f"{entry['model']} src {entry['src_len']} s2s {entry['precision']}",
                           f"{entry['value']:.2f}x vs {entry['against']} ({_spread(entry)})",
                           _verdict(entry["value"] >= GPU_VS_EAGER)))
    if not gpu:
        lines.append(_line(goal, "-", "no CUDA timings of s2s and eager", NOT_MEASURED))
    return lines


def _accuracy_lines(accuracy: dict[str, Any] | None) -> list[dict[str, str]]:
    goal = f"int8 exact match within {ACCURACY_POINTS} point of fp32"
    lines = []
    for beams in (1, 4):
        where = f"demo held-out, {_search(beams)}"
        if not accuracy or "error" in accuracy:
            lines.append(_line(goal, where, accuracy["error"] if accuracy else "run with --accuracy", NOT_MEASURED))
            continue
        scores = accuracy["exact_match"]
        fp32, int8 = scores.get("fp32", {}).get(str(beams)), scores.get("int8", {}).get(str(beams))
        if fp32 is None or int8 is None:
            lines.append(_line(goal, where, "no fp32 and int8 scores of this search", NOT_MEASURED))
            continue
        gap = 100 * (int8 - fp32)
        lines.append(_line(goal, f"{where}, {accuracy['examples']} instructions",
                           f"int8 {100 * int8:.2f}% vs fp32 {100 * fp32:.2f}% ({gap:+.2f} points)",
                           _verdict(abs(gap) <= ACCURACY_POINTS)))
    return lines


def _rss_lines(cpu: list[dict[str, Any]], speed_models: list[str], baseline: dict[str, Any] | None
               ) -> list[dict[str, str]]:
    goal = "s2s peak RSS no higher than the baseline run"
    mine = [r for r in cpu if r["engine"] == SUBJECT and r["status"] == "ok" and r["model"] in speed_models]
    if not mine:
        return [_line(goal, "-", "no s2s timings", NOT_MEASURED)]
    if not baseline:
        peaks = {p: max(r["peak_rss_mb"] for r in mine if r["precision"] == p) for p in dict.fromkeys(
            r["precision"] for r in mine)}
        shown = ", ".join(f"{p} up to {mb:.0f} MiB" for p, mb in peaks.items())
        return [_line(goal, "-", f"{shown}; no baseline (run with --baseline OLD/results.json)", NOT_MEASURED)]

    def key(r: dict[str, Any]) -> tuple:
        return r["model"], r["precision"], r["num_beams"], r["batch_size"], r["src_len"], r["new_tokens"]

    before = {key(r): r["peak_rss_mb"] for r in baseline["records"]}
    lines = []
    for model in speed_models:
        for precision in dict.fromkeys(r["precision"] for r in mine if r["model"] == model):
            pairs = [(r, before[key(r)]) for r in mine if r["model"] == model and r["precision"] == precision
                     and key(r) in before]
            where = f"{model} s2s {precision}"
            if not pairs:
                lines.append(_line(goal, where, f"no matching case in {baseline['file']}", NOT_MEASURED))
                continue
            worst, old = max(pairs, key=lambda pair: pair[0]["peak_rss_mb"] / pair[1])
            lines.append(_line(goal, f"{where}, worst of {len(pairs)} case(s)",
                               f"{worst['peak_rss_mb']:.0f} MiB vs {old:.0f} MiB at {_search(worst['num_beams'])} "
                               f"batch {worst['batch_size']}",
                               _verdict(worst["peak_rss_mb"] <= old * (1 + RSS_TOLERANCE))))
    return lines
