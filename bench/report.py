"""The report of one s2s-bench run: a terminal table, results.json, table.md, chart.png, breakdown.png.

results.json (schema_version 2) holds everything the table shows and more:
    {"schema_version", "tool", "created", "duration_s", "command", "machine", "versions", "settings",
     "results": [one record per model x engine x device x precision x case], "notes": [skipped engines],
     "ratios": [bench/ratios.py entries], "step_cost": [bench/step_cost.py `analyze` entries],
     "accuracy": bench/accuracy.py `measure` or {"error"} or None, "baseline": {"file", "records"} or None,
     "goals": [bench/goals.py `judge` lines]}
A record: model, engine, device, precision, num_beams, batch_size, src_len, new_tokens, length_rule
("min_new_tokens" | "eos", see bench/sources.py), status ("ok" | "failed"), note, latencies_ms (one
per round, see bench/compare.py), positions (place in each round's order), median_ms, p10_ms, p90_ms,
min_ms, max_ms, generated_tokens (per call, all rows), tokens_per_s, speedup_vs_eager (of medians),
speedup_vs_best_peer (s2s: paired, bench/ratios.py), peak_rss_mb, rss_scope, peak_gpu_mb (and on CUDA
gpu_scope, see bench/measure.py), identical_to_eager, token_match, load_s, tokens_file, and with
--breakdown a "breakdown" (see bench/breakdown.py `summarize`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click

from bench.engines import ENGINES
from bench.goals import STATUSES
from bench.step_cost import HALF_WINDOW
from runtime.manifest import installed_versions

SCHEMA_VERSION = 2
BUSY_SHARE = 0.05  # other processes' share of the CPU above which the report warns that timings are noisy
RECORD_KEYS = ("model", "engine", "device", "precision", "num_beams", "batch_size", "src_len", "new_tokens",
               "length_rule", "status", "generated_tokens", "median_ms", "p10_ms", "p90_ms", "tokens_per_s",
               "speedup_vs_eager", "peak_rss_mb", "peak_gpu_mb", "identical_to_eager", "token_match")
PACKAGES = ("onnxruntime", "onnxruntime-gpu", "numpy", "torch", "transformers", "optimum", "optimum-onnx",
            "ctranslate2", "s2s")


# -- what was measured on ---------------------------------------------------------------------------
def machine_info(others_share: float | None) -> dict[str, Any]:
    """The machine, and how much of its CPU other processes took during the run (others_share, 0..1)."""
    info: dict[str, Any] = {
        "cpu": _cpu_name(),
        "logical_cores": os.cpu_count() or 1,
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "gpu": _gpu_name(),
        "others_cpu_pct": None if others_share is None else round(100 * others_share, 1),
    }
    busy = others_share is not None and others_share > BUSY_SHARE
    info["warning"] = (f"other processes used {info['others_cpu_pct']}% of the CPU during the run: timings "
                       "are noisy") if busy else None
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _gpu_name() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else None


def package_versions() -> dict[str, str]:
    return installed_versions(PACKAGES)


# -- table ------------------------------------------------------------------------------------------
COLUMNS = ("model", "search", "batch", "src", "engine", "device", "prec", "median ms", "p10-p90 ms", "tok/s",
           "vs eager", "vs peer", "RSS MiB", "GPU MiB", "same tokens")


def _sorted_records(results: dict[str, Any]) -> list[dict[str, Any]]:
    order = {name: i for i, name in enumerate(ENGINES)}
    return sorted(results["results"], key=lambda r: (
        r["model"], r["num_beams"], r["src_len"], r["batch_size"], r["device"], order.get(r["engine"], 99),
        r["precision"]))


def _search(num_beams: int) -> str:
    return "greedy" if num_beams == 1 else f"beam {num_beams}"


def _same_tokens(record: dict[str, Any]) -> str:
    if record["status"] != "ok":
        return ""
    if record["engine"] == "eager" and record["precision"] == "fp32" and record["identical_to_eager"]:
        return "ref"
    if record["identical_to_eager"] is None:
        return "n/a"
    return "yes" if record["identical_to_eager"] else f"no ({100 * record['token_match']:.1f}%)"


def table_rows(results: dict[str, Any]) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """The table's header and rows as strings (the GPU column only when a GPU memory figure exists)."""
    records = _sorted_records(results)
    with_gpu = any(r.get("peak_gpu_mb") is not None for r in records)
    rows = []
    for r in records:
        ok = r["status"] == "ok"
        row = [r["model"], _search(r["num_beams"]), str(r["batch_size"]), str(r["src_len"]), r["engine"],
               r["device"], r["precision"],
               f"{r['median_ms']:.1f}" if ok else "failed",
               f"{r['p10_ms']:.0f}-{r['p90_ms']:.0f}" if ok else "",
               f"{r['tokens_per_s']:.0f}" if ok else "",
               f"{r['speedup_vs_eager']:.2f}x" if ok and r.get("speedup_vs_eager") else "",
               f"{r['speedup_vs_best_peer']:.2f}x" if ok and r.get("speedup_vs_best_peer") else "",
               f"{r['peak_rss_mb']:.0f}" if ok else "",
               f"{r['peak_gpu_mb']:.0f}" if ok and r.get("peak_gpu_mb") is not None else "",
               _same_tokens(r)]
        rows.append(tuple(row))
    header = COLUMNS
    if not with_gpu:
        drop = COLUMNS.index("GPU MiB")
        header = header[:drop] + header[drop + 1:]
        rows = [row[:drop] + row[drop + 1:] for row in rows]
    return header, rows


def _preamble(results: dict[str, Any]) -> list[str]:
    m, s = results["machine"], results["settings"]
    versions = ", ".join(f"{k} {v}" for k, v in results["versions"].items())
    lines = [
        f"machine: {m['cpu']}, {m['usable_cores']} usable cores, {m['memory_gib']} GiB"
        + (f", GPU {m['gpu']}" if m.get("gpu") else "")
        + (f"; other processes used {m['others_cpu_pct']}% of its CPU meanwhile" if m["others_cpu_pct"] is not None
           else ""),
        f"threads: {s['threads']} for every engine (torch intra-op, onnxruntime intra_op_num_threads, "
        "CTranslate2 intra_threads)",
        f"work: {s['new_tokens']} new tokens per sequence (min = max"
        + ("; models/ checkpoints: up to that, stopping at EOS" if any(
            r["length_rule"] == "eos" for r in results["results"]) else "")
        + f"), {s['warmup']} warm-up + {s['repeats']} timed calls per case; one process per engine x precision"
        + (" for all cases" if s["one_process"] else " per case")
        + ", all loaded at once and called in turn, the order rotating each round",
        "vs eager: ratio of medians; vs peer (s2s rows): over the faster of optimum and ct2 at the same precision, "
        "the median of per-round ratios",
        f"versions: {versions}",
        f"run: `{results['command']}` on {results['created'][:10]}",
    ]
    if m.get("warning"):
        lines.append(f"WARNING: {m['warning']}")
    return lines


def print_report(results: dict[str, Any]) -> None:
    header, rows = table_rows(results)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    numeric = {"batch", "src", "median ms", "p10-p90 ms", "tok/s", "vs eager", "vs peer", "RSS MiB", "GPU MiB"}

    def line(cells) -> str:
        return "  ".join(c.rjust(w) if h in numeric else c.ljust(w) for c, w, h in zip(cells, widths, header))

    click.echo("")
    for text in _preamble(results):
        click.echo(text)
    click.echo("")
    click.echo(line(header))
    click.echo(line("-" * w for w in widths))
    for row in rows:
        click.echo(line(row))
    for record in _sorted_records(results):
        if record["status"] != "ok":
            click.echo(f"failed: {record['engine']} {record['device']} {record['precision']} {record['model']} "
                       f"{_search(record['num_beams'])} batch {record['batch_size']} src {record['src_len']}: "
                       f"{record['note']}")
    for note in results["notes"]:
        click.echo(f"skipped: {note['engine']} ({note['device']}, {note['precision']}) on {note['model']}: "
                   f"{note['reason']}")
    for record in _sorted_records(results):
        if record.get("breakdown"):
            click.echo("")
            for text in breakdown_lines(record):
                click.echo(text)
    for block in (ratio_lines(results), step_cost_lines(results), accuracy_lines(results.get("accuracy"))):
        if block:
            click.echo("")
            for text in block:
                click.echo(text)
    click.echo("")
    for text in goal_lines(results):
        click.echo(text)


def markdown_table(results: dict[str, Any]) -> str:
    header, rows = table_rows(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    notes = [f"- {n['engine']} ({n['device']}, {n['precision']}) on {n['model']}: {n['reason']}"
             for n in results["notes"]]
    goals = ["| result | goal | where | measured |", "|---|---|---|---|"]
    goals += [f"| {g['status']} | {g['goal']} | {g['where']} | {g['measured']} |" for g in results["goals"]]
    extra = []
    for block in (ratio_lines(results), step_cost_lines(results), accuracy_lines(results.get("accuracy"))):
        if block:
            extra += ["", "```", *block, "```"]
    return "\n".join(["\n".join(f"{line}  " for line in _preamble(results)), "", *lines,
                      *(["", "Skipped:", *notes] if notes else []), *extra,
                      "", f"Goals of issue 10 ({_goal_counts(results)}):", "", *goals, ""])


# -- ratios, step cost, accuracy, goals ------------------------------------------------------------
RATIO_TITLES = {"vs_best_peer": "over the faster peer", "vs_eager": "over eager", "vs_fp32": "over fp32",
                "batch_scaling": "tokens/s over batch 1"}


def ratio_lines(results: dict[str, Any]) -> list[str]:
    """Every ratio of bench/ratios.py: paired ones with the p10-p90 of their per-round quotients."""
    entries = results.get("ratios") or []
    if not entries:
        return []
    out = ["ratios (s2s; paired: the median of per-round ratios, p10-p90 of them; batch scaling: of medians):"]
    for e in entries:
        spread = f"p10-p90 {e['p10']:.2f}-{e['p90']:.2f}, {e['pairs']} pairs" if e["paired"] else "of medians"
        out.append(f"  {e['model']} {e['device']} {_search(e['num_beams'])} batch {e['batch_size']} src {e['src_len']} "
                   f"s2s {e['precision']} {RATIO_TITLES[e['kind']]} ({e['against']}): {e['value']:.2f}x ({spread})")
    return out


def step_cost_lines(results: dict[str, Any]) -> list[str]:
    entries = results.get("step_cost") or []
    if not entries:
        return []
    out = [f"step cost (s2s, one decoding step with the loop's work, median over {2 * HALF_WINDOW + 1} steps around "
           "each past length; greedy: steps at both lengths timed in turn; beam: both from one call):"]
    for e in entries:
        pasts = sorted(e["step_ms"], key=int)
        inside = e.get("inside_ms") or {}
        out.append(f"  {e['model']} {e['device']} {_search(e['num_beams'])} batch {e['batch_size']} {e['precision']}: "
                   + ", ".join(f"past {p} {e['step_ms'][p]:.2f} ms" + (f" ({inside[p]:.2f} inside)" if p in inside
                                                                      else "") for p in pasts)
                   + f"; {pasts[-1]}/{pasts[0]} = {e['ratio']:.2f}x (p10-p90 {e['ratio_p10']:.2f}-{e['ratio_p90']:.2f}"
                   + (f", inside session.run {e['inside_ratio']:.2f}x" if e.get("inside_ratio") else "")
                   + f", {e['method']}, {e['calls']} calls)")
    return out


def accuracy_lines(accuracy: dict[str, Any] | None) -> list[str]:
    """bench/accuracy.py's scores: a row per precision, exact match per search, agreement with fp32."""
    if not accuracy:
        return []
    if "error" in accuracy:
        return [f"accuracy: not measured: {accuracy['error']}"]
    searches = list(next(iter(accuracy["exact_match"].values())))
    names = [_search(int(b)) for b in searches]
    out = [f"accuracy: {accuracy['model']} model, {accuracy['examples']} held-out instructions, exact match "
           f"({', '.join(names)}); in brackets: answers equal to fp32's"]
    for precision, scores in accuracy["exact_match"].items():
        same = accuracy["same_answers_as_fp32"].get(precision, {})
        out.append(f"  {precision:<5} " + "  ".join(
            f"{name} {100 * scores[b]:.2f}%" + (f" [{100 * same[b]:.2f}%]" if precision != "fp32" and b in same else "")
            for b, name in zip(searches, names)))
    return out


def _goal_counts(results: dict[str, Any]) -> str:
    counts = {status: sum(g["status"] == status for g in results["goals"]) for status in STATUSES}
    return ", ".join(f"{n} {status}" for status, n in counts.items())


def goal_lines(results: dict[str, Any]) -> list[str]:
    out = [f"Goals of issue 10 ({_goal_counts(results)}):"]
    width = max((len(g["status"]) for g in results["goals"]), default=0)
    for g in results["goals"]:
        status = g["status"].upper() if g["status"] == "fail" else g["status"]
        out.append(f"  {status:<{width}}  {g['goal']} | {g['where']} | {g['measured']}")
    return out


# -- breakdown --------------------------------------------------------------------------------------
def breakdown_lines(record: dict[str, Any], first: int = 4, last: int = 2) -> list[str]:
    """Where one case's time goes: totals, per graph, then per step (the middle steps elided)."""
    b = record["breakdown"]
    lines = [
        f"breakdown: {record['engine']} {record['device']} {record['precision']} {record['model']} "
        f"{_search(record['num_beams'])} batch {record['batch_size']} src {record['src_len']} "
        f"(the median of {b['calls']} calls; per run: medians)",
        f"  total {b['total_ms']:.1f} ms = inside session.run {b['inside_ms']:.1f} ms + outside "
        f"{b['outside_ms']:.1f} ms ({b['outside_pct']:.1f}% outside)",
    ]
    for graph, g in b["per_graph"].items():
        lines.append(f"  {graph}: {g['runs']} run(s), {g['inside_ms']:.1f} ms inside; "
                     f"per run {g['median_inside_ms']:.2f} ms inside, "
                     f"{g['median_outside_before_ms']:.3f} ms outside before it")
    lines.append(f"  after the last run: {b['tail_ms']:.3f} ms")
    lines.append("  step  graph               inside ms  outside ms (before)")
    runs = b["runs"]
    shown = range(len(runs)) if len(runs) <= first + last + 1 \
        else [*range(first), None, *range(len(runs) - last, len(runs))]
    for index in shown:
        if index is None:
            lines.append("  ...")
            continue
        run = runs[index]
        lines.append(f"  {index:>4}  {run['graph']:<18}  {run['inside_ms']:>9.3f}  {run['outside_before_ms']:>10.3f}")
    return lines


# -- files ------------------------------------------------------------------------------------------
def write_all(results: dict[str, Any], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / "results.json", out_dir / "table.md"]
    written[0].write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    written[1].write_text(markdown_table(results), encoding="utf-8")
    if any(r["status"] == "ok" for r in results["results"]):
        written.append(write_chart(results, out_dir / "chart.png"))
    if any(r.get("breakdown") for r in results["results"]):
        written.append(write_breakdown_chart(results, out_dir / "breakdown.png"))
    return written


def _grid(count: int) -> tuple[int, int]:
    cols = min(3, count)
    return math.ceil(count / cols), cols


def write_chart(results: dict[str, Any], path: Path) -> Path:
    """Median latency by batch size, one line per engine (x device x precision), one panel per workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    def label(r: dict[str, Any]) -> str:
        return f"{r['engine']} {r['device']} {r['precision']}"

    ok = [r for r in _sorted_records(results) if r["status"] == "ok"]
    colors = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(label(r) for r in ok))}  # same in every panel
    panels = list(dict.fromkeys((r["model"], r["num_beams"], r["src_len"]) for r in ok))
    rows, cols = _grid(len(panels))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.0 * rows), squeeze=False)
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    for ax, (model, beams, src) in zip(axes.flat, panels):
        mine = [r for r in ok if (r["model"], r["num_beams"], r["src_len"]) == (model, beams, src)]
        for name in dict.fromkeys(label(r) for r in mine):
            line = sorted((r["batch_size"], r["median_ms"]) for r in mine if label(r) == name)
            ax.plot([b for b, _ in line], [ms for _, ms in line], marker="o", label=name, color=colors[name])
        batches = sorted({r["batch_size"] for r in mine})
        ax.set_xscale("log", base=2)
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        low, high = ax.get_ylim()
        ax.yaxis.set_minor_formatter(plain if high / low < 10 else NullFormatter())  # label minor ticks within a decade
        ax.set_xlabel("batch size")
        ax.set_ylabel("median latency (ms)")
        ax.set_title(f"{model}, {_search(beams)}, {src} source tokens", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    s, m = results["settings"], results["machine"]
    fig.suptitle(f"s2s-bench: {s['new_tokens']} new tokens, {s['threads']} threads, {m['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_breakdown_chart(results: dict[str, Any], path: Path, max_panels: int = 6) -> Path:
    """Per decoding step: time inside session.run (stacked with) the time outside before it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in _sorted_records(results) if r.get("breakdown")][:max_panels]
    rows, cols = _grid(len(records))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax, record in zip(axes.flat, records):
        runs = record["breakdown"]["runs"]
        steps = range(len(runs))
        inside = [r["inside_ms"] for r in runs]
        outside = [r["outside_before_ms"] for r in runs]
        ax.bar(steps, inside, label="inside session.run", color="tab:blue")
        ax.bar(steps, outside, bottom=inside, label="outside (before the run)", color="tab:orange")
        ax.set_xlabel("session run (0 = encoder)")
        ax.set_ylabel("ms")
        ax.set_title(f"{record['engine']} {record['precision']} {record['model']} {_search(record['num_beams'])} "
                     f"b{record['batch_size']}: {record['breakdown']['outside_pct']:.1f}% outside", fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(records):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
