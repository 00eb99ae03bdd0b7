"""Does s2s-run's memory stay flat as its input grows? Peak RSS of one model over a small and a big file.

Each file size runs as its own s2s-run process writing to -o (through FILE.partial), on the same model
and settings; the peak resident memory of each process (wait4) is compared. Generation is kept short
(--max-new-tokens 1 by default) so that 200,000 lines finish in minutes: the memory at stake is the
pipeline's (inputs read ahead, results waiting for an earlier one, the output), which a longer
generation does not change, while the model's working memory is bounded by the batch limits.

    python -m bench.big_file                                      # t5-small shape, int8, 5,000 vs 200,000 lines
    python -m bench.big_file --model tiny-t5 --precision fp32     # the pipeline alone, in seconds
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import click

from bench.text_inputs import prepared_text_export, run_s2s_run, write_lines
from runtime.clickutil import S2SCommand
from runtime.errors import InvalidOptionError
from runtime.manifest import Manifest


@click.command(cls=S2SCommand)
@click.option("--model", default="t5-small", show_default=True, help="A bench shape (bench/shapes.py) or checkpoint.")
@click.option("--precision", type=click.Choice(["fp32", "int8"]), default="int8", show_default=True)
@click.option("--export", "export_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Use this s2s export of the model instead of exporting it (e.g. one in the bench cache).")
@click.option("--lines", "line_counts", default="5000,200000", show_default=True, help="File sizes to compare.")
@click.option("--median-words", type=float, default=8.0, show_default=True)
@click.option("--longest", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path.home() / ".cache" / "s2s-bench", show_default=True)
def main(model: str, precision: str, export_dir: Path | None, line_counts: str, median_words: float, longest: int,
         max_new_tokens: int, threads: int, cache_dir: Path) -> None:
    try:
        counts = [int(n) for n in line_counts.split(",")]
    except ValueError:
        raise InvalidOptionError(f"--lines {line_counts!r}: expected counts like '5000,200000'") from None
    export = prepared_text_export(model, precision, cache_dir, export_dir)
    vocab = Manifest.read(export).vocab_size
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in counts:
            inputs = write_lines(Path(tmp) / f"in-{count}.txt", count, vocab, median_words=median_words,
                                 longest=longest)
            result = run_s2s_run([str(export), "-i", str(inputs), "-o", str(Path(tmp) / f"out-{count}.txt"),
                                  "--provider", "cpu", "--threads", str(threads),
                                  "--max-new-tokens", str(max_new_tokens)])
            click.echo(f"{count} lines: {result.peak_rss_mib:.1f} MiB peak, {result.wall_s:.0f} s", err=True)
            rows.append((count, result))
            inputs.unlink()
    click.echo(f"\n{model} {precision}, lines of median {median_words:g} words (at most {longest}), "
               f"{max_new_tokens} new token(s) each, {threads} threads, s2s-run defaults otherwise, -o FILE\n")
    click.echo("| lines | peak RSS MiB | vs first | wall s | lines/s |")
    click.echo("|---|---|---|---|---|")
    first = rows[0][1].peak_rss_mib
    for count, result in rows:
        click.echo(f"| {count:,} | {result.peak_rss_mib:.1f} | {result.peak_rss_mib - first:+.1f} | "
                   f"{result.wall_s:.0f} | {result.lines_per_s:.0f} |")


if __name__ == "__main__":
    main()
