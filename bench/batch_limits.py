"""Which --batch-size / --max-batch-tokens should s2s-run default to? Measure them on one input file.

Each setting runs as its own s2s-run process over the same seeded file (sentence-like lengths), the
settings taking turns round after round, so that each one's speed is compared with the first setting's
within the same round (a paired ratio) on a machine whose load drifts. Reported per setting: median
lines/s and generated tokens/s of the generation (s2s-run's own summary, model load excluded), the
median paired ratio to the first setting, and the peak resident memory of the process.

    python -m bench.batch_limits                                   # t5-small shape, fp32, 2 threads
    python -m bench.batch_limits --settings 16:0,32:4096 --rounds 5 --lines 512
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import click

from bench.text_inputs import RunResult, prepared_text_export, run_s2s_run, write_lines
from runtime.clickutil import S2SCommand
from runtime.errors import InvalidOptionError
from runtime.manifest import Manifest


def _settings(value: str) -> list[tuple[int, int]]:
    """"16:0,32:4096" -> [(16, 0), (32, 4096)]: batch size and max batch tokens (0 = no limit)."""
    try:
        pairs = [tuple(int(n) for n in item.split(":")) for item in value.split(",") if item.strip()]
    except ValueError:
        pairs = []
    if not pairs or any(len(p) != 2 or p[0] < 1 or p[1] < 0 for p in pairs):
        raise InvalidOptionError(f"--settings {value!r}: expected BATCH:TOKENS pairs like '16:0,32:4096'")
    return pairs  # type: ignore[return-value]


@click.command(cls=S2SCommand)
@click.option("--model", default="t5-small", show_default=True, help="A bench shape (bench/shapes.py) or checkpoint.")
@click.option("--precision", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True)
@click.option("--export", "export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Use this s2s export of the model instead of exporting it (e.g. one in the bench cache).")
@click.option("--settings", "settings_text", default="16:0,8:0,32:0,64:0,32:4096,64:4096,64:2048", show_default=True,
              help="BATCH:TOKENS pairs to compare (0 = no token limit); the first is the ratios' reference.")
@click.option("--lines", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--median-words", type=float, default=20.0, show_default=True, help="Median source length (words = tokens - 1).")
@click.option("--longest", type=click.IntRange(min=1), default=200, show_default=True, help="Longest source line in words.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path.home() / ".cache" / "s2s-bench", show_default=True)
def main(model: str, precision: str, export_dir: Path | None, settings_text: str, lines: int, median_words: float,
         longest: int, max_new_tokens: int, threads: int, rounds: int, cache_dir: Path) -> None:
    settings = _settings(settings_text)
    export = prepared_text_export(model, precision, cache_dir, export_dir)
    vocab = Manifest.read(export).vocab_size
    results: dict[tuple[int, int], list[RunResult]] = {s: [] for s in settings}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = write_lines(Path(tmp) / "inputs.txt", lines, vocab, median_words=median_words, longest=longest)
        for round_number in range(rounds):
            # rotate the order each round, so no setting always runs first (or right after the heaviest)
            turn = settings[round_number % len(settings):] + settings[: round_number % len(settings)]
            for batch_size, tokens in turn:
                result = run_s2s_run([str(export), "-i", str(inputs), "--provider", "cpu", "--threads", str(threads),
                                      "--batch-size", str(batch_size), "--max-batch-tokens", str(tokens),
                                      "--max-new-tokens", str(max_new_tokens), "--min-new-tokens", str(max_new_tokens)])
                results[(batch_size, tokens)].append(result)
                click.echo(f"round {round_number + 1}: batch {batch_size}, tokens {tokens or 'no limit'}: "
                           f"{result.lines_per_s:.1f} lines/s, {result.peak_rss_mib:.0f} MiB", err=True)
    reference = results[settings[0]]
    click.echo(f"\n{model} {precision}, {lines} lines (median {median_words:g} words, at most {longest}), "
               f"{max_new_tokens} new tokens each, {threads} threads, {rounds} rounds\n")
    click.echo("| --batch-size | --max-batch-tokens | lines/s | generated tok/s | vs first (paired) | peak RSS MiB |")
    click.echo("|---|---|---|---|---|---|")
    for (batch_size, tokens), runs in results.items():
        ratio = statistics.median(r.lines_per_s / ref.lines_per_s for r, ref in zip(runs, reference))
        click.echo(f"| {batch_size} | {tokens or 'no limit'} | {statistics.median(r.lines_per_s for r in runs):.1f} | "
                   f"{statistics.median(r.tokens_per_s for r in runs):.0f} | {ratio:.2f}x | "
                   f"{max(r.peak_rss_mib for r in runs):.0f} |")


if __name__ == "__main__":
    main()
