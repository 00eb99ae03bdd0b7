"""Exact match of the s2s runtime at each CPU precision against fp32, on the trained demo model.

Random weights say nothing about what int8 costs in accuracy; the demo model (models/demo, trained by
`s2s-train`) does: its held-out instructions (never seen in training) are scored the way `make demo`
scores them (demo/__init__.py, models/evaluate.py), greedy and beam 4, once per precision the s2s
engine runs on the CPU (fp32, int8, ...), each from s2s-export's export of the same checkpoint.

    python -m bench.accuracy [--threads N]     (also: s2s-bench --accuracy)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from bench import report
from bench.engines import s2s as s2s_engine
from bench.sources import resolve
from demo import HELD_OUT_PER_TASK, NUM_BEAMS
from models.evaluate import exact_match
from models.tasks import held_out_examples
from runtime.clickutil import S2SCommand

SEARCHES = (1, NUM_BEAMS)  # greedy, and the beam width `make demo` uses


def measure(cache_dir: Path, threads: int, examples: list[tuple[str, str]] | None = None,
            say=lambda message: None) -> dict[str, Any]:
    """Score every CPU precision of s2s on the demo's held-out set (or `examples`: (instruction, answer) pairs).

    Returns {"model": "demo", "examples": n, "threads", "exact_match": {precision: {"1": share, "4": share}},
    "same_answers_as_fp32": {precision: {...}} (share of answers equal to fp32's), "seconds": {precision: s}}.

    Raises:
        ExportDirError: the demo model is not in models/demo.
    """
    import runtime
    from exporter.quiet import library_output_captured

    source = resolve("demo", cache_dir)
    examples = held_out_examples(HELD_OUT_PER_TASK) if examples is None else examples
    instructions, targets = [s for s, _ in examples], [t for _, t in examples]
    result: dict[str, Any] = {"model": "demo", "examples": len(examples), "threads": threads, "exact_match": {},
                              "same_answers_as_fp32": {}, "seconds": {}}
    answers: dict[str, dict[int, list[str]]] = {}
    for precision in s2s_engine.precisions("cpu"):
        say(f"accuracy: s2s {precision} on the demo's {len(examples)} held-out instructions ...")
        with library_output_captured():
            export_dir = s2s_engine.prepare(source, precision, "cpu", cache_dir)
        model = runtime.load(export_dir, provider="cpu", threads=threads)
        started = time.perf_counter()
        answers[precision] = {beams: model.generate_text(instructions, num_beams=beams) for beams in SEARCHES}
        result["seconds"][precision] = time.perf_counter() - started
        result["exact_match"][precision] = {str(b): exact_match(answers[precision][b], targets) for b in SEARCHES}
        if "fp32" in answers:
            result["same_answers_as_fp32"][precision] = {
                str(b): exact_match(answers[precision][b], answers["fp32"][b]) for b in SEARCHES}
    return result


@click.command(cls=S2SCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True,
              help="onnxruntime intra-op threads.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the exports are kept (default: s2s-bench's, ~/.cache/s2s-bench).")
def main(threads: int, cache_dir: Path | None) -> None:
    """Exact match of s2s at fp32 and int8 (each CPU precision) on the demo model's held-out set."""
    from bench.cli import default_cache_dir

    accuracy = measure(cache_dir or default_cache_dir(), threads, say=lambda m: click.echo(m, err=True))
    for text in report.accuracy_lines(accuracy):
        click.echo(text)


if __name__ == "__main__":
    main()
