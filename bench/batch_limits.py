"""Which --batch-size / --max-batch-tokens should s2s-run default to? Measure them on one input file.

Speed: one model loaded once, the settings taking turns pass after pass over the same seeded lines
(sentence-like lengths) through `Model.generate_text_iter`, the order rotating each round, so that each
setting is compared with the first one within the same round (a paired ratio, then the median over
rounds) on a machine whose load drifts. Memory: each setting once more as its own s2s-run process over
the same lines, its peak resident memory (wait4). Every row generates exactly --max-new-tokens tokens
(min = max), so every setting does the same work.

    python -m bench.batch_limits                                   # t5-small shape, fp32, 2 threads
    python -m bench.batch_limits --settings 16:0,32:4096 --rounds 5 --lines 512
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import click

from bench.text_inputs import prepared_text_export, run_s2s_run, write_lines
from runtime.clickutil import S2SCommand
from runtime.errors import InvalidOptionError


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
@click.option("--settings", "settings_text", default="16:0,8:0,32:0,64:0,32:4096,64:4096,64:2048",
              show_default=True, help="BATCH:TOKENS pairs to compare (0 = no token limit); the first is the reference.")
@click.option("--lines", "line_count", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--median-words", type=float, default=20.0, show_default=True,
              help="Median source length (words = tokens - 1).")
@click.option("--longest", type=click.IntRange(min=1), default=200, show_default=True,
              help="Longest source line in words.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path.home() / ".cache" / "s2s-bench", show_default=True)
def main(model: str, precision: str, export_dir: Path | None, settings_text: str, line_count: int,
         median_words: float, longest: int, max_new_tokens: int, threads: int, rounds: int, cache_dir: Path) -> None:
    import runtime

    settings = _settings(settings_text)
    export = prepared_text_export(model, precision, cache_dir, export_dir)
    loaded = runtime.load(export, provider="cpu", threads=threads)
    work = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens)
    seconds: dict[tuple[int, int], list[float]] = {s: [] for s in settings}
    peak_mib: dict[tuple[int, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        inputs = write_lines(Path(tmp) / "inputs.txt", line_count, loaded.manifest.vocab_size,
                             median_words=median_words, longest=longest)
        lines = inputs.read_text(encoding="utf-8").splitlines()
        list(loaded.generate_text_iter(lines[:8], **work))  # warm-up: sessions, arena, tokenizer
        for round_number in range(rounds):
            # rotate the order each round, so no setting always runs first (or right after the heaviest)
            shift = round_number % len(settings)
            for batch_size, tokens in settings[shift:] + settings[:shift]:
                started = time.perf_counter()
                list(loaded.generate_text_iter(lines, batch_size=batch_size, max_batch_tokens=tokens or None, **work))
                seconds[(batch_size, tokens)].append(time.perf_counter() - started)
                click.echo(f"round {round_number + 1}: batch {batch_size}, tokens {tokens or 'no limit'}: "
                           f"{line_count / seconds[(batch_size, tokens)][-1]:.1f} lines/s", err=True)
        for batch_size, tokens in settings:
            peak_mib[(batch_size, tokens)] = run_s2s_run([
                str(export), "-i", str(inputs), "--provider", "cpu", "--threads", str(threads),
                "--batch-size", str(batch_size), "--max-batch-tokens", str(tokens),
                "--max-new-tokens", str(max_new_tokens), "--min-new-tokens", str(max_new_tokens)]).peak_rss_mib
    reference = seconds[settings[0]]
    lengths = sorted(len(line.split()) + 1 for line in lines)
    click.echo(f"\n{model} {precision}, {line_count} lines of {lengths[len(lengths) // 2]} source tokens (median; "
               f"{lengths[0]}..{lengths[-1]}), {max_new_tokens} new tokens each, {threads} threads, {rounds} rounds\n")
    click.echo("| --batch-size | --max-batch-tokens | lines/s | generated tok/s | speed vs first (paired) "
               "| s2s-run peak RSS MiB |")
    click.echo("|---|---|---|---|---|---|")
    for (batch_size, tokens), runs in seconds.items():
        ratio = statistics.median(ref / run for run, ref in zip(runs, reference, strict=True))
        per_s = line_count / statistics.median(runs)
        click.echo(f"| {batch_size} | {tokens or 'no limit'} | {per_s:.1f} | {per_s * max_new_tokens:.0f} | "
                   f"{ratio:.2f}x | {peak_mib[(batch_size, tokens)]:.0f} |")


if __name__ == "__main__":
    main()
