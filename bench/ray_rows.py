"""Rows/s of Ray Data batch inference (runtime.batch.TextGenerator) with 1 and 2 actors, on a local Ray.

    python -m bench.ray_rows                         # t5-small shape, fp32, 256 rows, batch 32, 32 new tokens
    python -m bench.ray_rows --precision int8 --rows 512 --rounds 3

Each setting is ACTORSxTHREADS: that many actors (`ActorPoolStrategy(size=ACTORS)`, one CPU each
reserved per thread) each holding one model with that many onnxruntime threads, over the same seeded
rows (sentence-like lengths, bench/text_inputs.py) with exactly --max-new-tokens new tokens each (min =
max), so every setting does the same work. `inproc` is the same TextGenerator called on the same
batches one after another in this process, no Ray (its threads: --threads-inproc). Settings take
turns, the order rotating each round; medians over rounds. Per run:

- job rows/s: rows / the whole `map_batches(...).materialize()`, actor start and model load included;
- generating rows/s: rows / (last batch finished - first batch started), from the actors' timestamps;
- CPU ms per row: CPU time the generating processes spent (all their threads), per row. On a shared
  machine the rates move with the other load; this one much less, so it shows whether a second
  actor costs more CPU per row than one (a rate that does not grow then means no free core).

Ray is started here with --num-cpus CPUs, no dashboard, no usage statistics.
"""

from __future__ import annotations

import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from bench.text_inputs import prepared_text_export, write_lines
from runtime.batch import TextGenerator
from runtime.clickutil import S2SCommand
from runtime.errors import InvalidOptionError


class TimedTextGenerator(TextGenerator):
    """TextGenerator that also records, in each row, when its batch started and ended (time.time()) and the
    CPU seconds its process spent on the batch (every thread) divided by the batch's rows."""

    def __call__(self, batch: Any) -> Any:
        started, cpu = time.time(), time.process_time()
        out = super().__call__(batch)
        rows = len(out[self.output_column])
        cpu_per_row = (time.process_time() - cpu) / rows
        return {**out, "batch_started": np.full(rows, started), "batch_ended": np.full(rows, time.time()),
                "cpu_s": np.full(rows, cpu_per_row)}


def _settings(value: str) -> list[str]:
    """"1x2,2x1,inproc" -> the same, checked."""
    settings = [item.strip() for item in value.split(",") if item.strip()]
    for setting in settings:
        parts = setting.split("x")
        if setting != "inproc" and not (len(parts) == 2 and all(p.isdigit() and int(p) >= 1 for p in parts)):
            raise InvalidOptionError(f"--settings {value!r}: expected ACTORSxTHREADS items or 'inproc', like '1x2,2x1'")
    if not settings:
        raise InvalidOptionError("--settings is empty")
    return settings


@click.command(cls=S2SCommand)
@click.option("--model", default="t5-small", show_default=True, help="A bench shape (bench/shapes.py) or checkpoint.")
@click.option("--precision", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True)
@click.option("--settings", "settings_text", default="1x2,2x1,1x1,inproc", show_default=True,
              help="ACTORSxTHREADS items (actors x onnxruntime threads per actor), and 'inproc' (no Ray).")
@click.option("--rows", "row_count", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Rows per map_batches call (and per generate_text_iter batch in-process).")
@click.option("--median-words", type=float, default=20.0, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--threads-inproc", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--num-cpus", type=click.IntRange(min=1), default=2, show_default=True, help="CPUs of the local Ray.")
@click.option("--rounds", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path.home() / ".cache" / "s2s-bench", show_default=True)
def main(model: str, precision: str, settings_text: str, row_count: int, batch_size: int, median_words: float,
         max_new_tokens: int, threads_inproc: int, num_cpus: int, rounds: int, cache_dir: Path) -> None:
    settings = _settings(settings_text)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import ray.data

    export = prepared_text_export(model, precision, cache_dir)
    work = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
    ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING")
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # no "Starting execution of Dataset" per run
    ray.data.DataContext.get_current().enable_progress_bars = False
    job_rate: dict[str, list[float]] = {s: [] for s in settings}
    generating_rate: dict[str, list[float]] = {s: [] for s in settings}
    cpu_ms: dict[str, list[float]] = {s: [] for s in settings}
    local = TimedTextGenerator(export, provider="cpu", threads=threads_inproc, **work)
    with tempfile.TemporaryDirectory() as tmp:
        lines = write_lines(Path(tmp) / "rows.txt", row_count, local.model.manifest.vocab_size,
                            median_words=median_words).read_text(encoding="utf-8").splitlines()
        dataset = ray.data.from_items([{"id": i, "text": line} for i, line in enumerate(lines)]).materialize()
        local({"text": np.array(lines[:8], dtype=object)})  # warm-up of the in-process model
        for round_number in range(rounds):
            shift = round_number % len(settings)  # rotate, so that no setting always runs first
            for setting in settings[shift:] + settings[:shift]:
                started = time.perf_counter()
                if setting == "inproc":
                    parts = [local({"id": np.arange(start, min(start + batch_size, row_count)),
                                    "text": np.array(lines[start:start + batch_size], dtype=object)})
                             for start in range(0, row_count, batch_size)]
                    job = generating = time.perf_counter() - started
                    cpu = sum(float(part["cpu_s"].sum()) for part in parts)
                else:
                    actors, threads = (int(part) for part in setting.split("x"))
                    done = dataset.map_batches(
                        TimedTextGenerator, batch_size=batch_size, num_cpus=threads,
                        fn_constructor_kwargs=dict(export_dir=str(export), provider="cpu", threads=threads, **work),
                        compute=ray.data.ActorPoolStrategy(size=actors)).materialize()
                    job = time.perf_counter() - started
                    timings = done.select_columns(["batch_started", "batch_ended", "cpu_s"]).to_pandas()
                    assert len(timings) == row_count
                    generating = timings["batch_ended"].max() - timings["batch_started"].min()
                    cpu = float(timings["cpu_s"].sum())
                job_rate[setting].append(row_count / job)
                generating_rate[setting].append(row_count / generating)
                cpu_ms[setting].append(1000 * cpu / row_count)
                click.echo(f"round {round_number + 1}: {setting}: job {job_rate[setting][-1]:.2f} rows/s, "
                           f"generating {generating_rate[setting][-1]:.2f} rows/s, {cpu_ms[setting][-1]:.0f} CPU ms "
                           "per row", err=True)
    ray.shutdown()
    click.echo(f"\n{model} {precision}, {row_count} rows (median {median_words:g} words), batch {batch_size}, "
               f"{max_new_tokens} new tokens each (min = max), greedy; local Ray with {num_cpus} CPUs; "
               f"median of {rounds} round(s)\n")
    click.echo("| setting | actors | threads per actor | job rows/s | generating rows/s | CPU ms per row |")
    click.echo("|---|---|---|---|---|---|")
    for setting in settings:
        actors, threads = ("-", str(threads_inproc)) if setting == "inproc" else setting.split("x")
        click.echo(f"| {setting} | {actors} | {threads} | {statistics.median(job_rate[setting]):.2f} | "
                   f"{statistics.median(generating_rate[setting]):.2f} | {statistics.median(cpu_ms[setting]):.0f} |")


if __name__ == "__main__":
    main()
