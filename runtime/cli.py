"""s2s-run: generate text with an exported model.

Texts come from arguments, from --input-file (one per line), or from stdin. Outputs go to stdout (or
--output, written whole or not at all), one line per output, or one JSON object per input with --json.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import click

from runtime.clickutil import S2SCommand
from runtime.errors import InvalidInputError, InvalidOptionError

EPILOG = """\b
Examples:
  s2s-run out/t5 "translate English to German: Hello"
  s2s-run out/t5 --num-beams 4 --num-return-sequences 2 "summarize: ..."
  s2s-run out/t5 --input-file inputs.txt --batch-size 32 --json -o results.jsonl
  cat inputs.txt | s2s-run out/t5 --provider cuda
"""


def _early_stopping(value: str | None) -> bool | str | None:
    if value is None:
        return None
    return {"true": True, "false": False, "never": "never"}[value]


def _bad_words(value: str | None) -> list[list[int]] | None:
    """"3,4;7" -> [[3, 4], [7]]."""
    if value is None:
        return None
    try:
        return [[int(t) for t in group.split(",")] for group in value.split(";") if group.strip()]
    except ValueError:
        raise InvalidOptionError(f"--bad-words-ids {value!r}: expected token ids like '3,4;7'") from None


def _read_inputs(texts: tuple[str, ...], input_file: str | None) -> tuple[list[str], bool]:
    """Returns the input texts and whether they came from a file/stdin (for the progress bar)."""
    if texts and input_file:
        raise InvalidOptionError("give texts as arguments or with --input-file, not both")
    if texts:
        return list(texts), False
    if input_file is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise InvalidInputError("no input: give texts as arguments, --input-file FILE, or pipe lines into stdin")
        input_file = "-"
    try:
        with click.open_file(input_file, "r", encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise InvalidInputError(f"cannot read --input-file {input_file!r}: {err}") from None
    while lines and not lines[-1].strip():
        lines.pop()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            raise InvalidInputError(f"line {number} of {input_file!r} is empty; remove it or give it text")
    if not lines:
        raise InvalidInputError(f"{input_file!r} holds no input lines")
    return lines, True


def _batches(order: list[int], batch_size: int) -> Iterator[list[int]]:
    for start in range(0, len(order), batch_size):
        yield order[start: start + batch_size]


@click.command(cls=S2SCommand, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.argument("texts", nargs=-1)
@click.option("-i", "--input-file", help="Read inputs from this file, one per line ('-' for stdin).")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Write results to this file (written whole at the end, or not at all); default stdout.")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per input: input, outputs, token_ids, scores (beam search).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Execution provider. auto = CUDA when it works, else CPU; cuda fails if CUDA cannot run.")
@click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads per session (default: all cores).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Inputs generated together. Inputs are grouped by length to pad less; output keeps input order.")
@click.option("--truncate", is_flag=True, help="Cut inputs longer than the model's maximum (with a warning) instead of failing.")
@click.option("--num-beams", type=int, help="Beam width; 1 = greedy. Default: the model's generation_config.")
@click.option("--num-return-sequences", type=int, help="Outputs per input (<= --num-beams for beam search).")
@click.option("--max-new-tokens", type=int, help="Most tokens to generate (wins over --max-length).")
@click.option("--max-length", type=int, help="Most decoder tokens, the start token included.")
@click.option("--min-new-tokens", type=int, help="Fewest tokens to generate before EOS is allowed.")
@click.option("--min-length", type=int, help="Fewest decoder tokens (start token included) before EOS.")
@click.option("--length-penalty", type=float, help="Beam score = logprob sum / length**penalty; >0 favours long outputs.")
@click.option("--early-stopping", type=click.Choice(["true", "false", "never"]),
              help="Beam search stop rule, as in transformers.")
@click.option("--no-repeat-ngram-size", type=int, help="Never repeat an n-gram of this size; 0 = off.")
@click.option("--repetition-penalty", type=float, help="Penalise tokens already generated; 1.0 = off.")
@click.option("--bad-words-ids", help="Token id sequences never to generate, e.g. '3,4;7'.")
@click.option("--forced-bos-token-id", type=int, help="Token forced as the first generated token.")
@click.option("--forced-eos-token-id", type=int, help="Token forced when the maximum length is reached.")
@click.option("--decoder-start-token-id", type=int, help="Token the decoder starts from (default: the model's).")
@click.option("--eos-token-id", type=int, multiple=True, help="End-of-sequence token (repeat for several); default: the model's.")
@click.option("--pad-token-id", type=int, help="Token that fills finished sequences; default: the model's.")
@click.option("--do-sample/--no-do-sample", default=None,
              help="Sample instead of greedy/beam decoding (num_beams must be 1). Default: the model's generation_config.")
@click.option("--temperature", type=float, help="Sampling temperature; 1.0 = unchanged.")
@click.option("--top-k", type=int, help="Sample among the k most likely tokens; 0 = off.")
@click.option("--top-p", type=float, help="Sample among the smallest set of tokens with this total probability; 1.0 = off.")
@click.option("--seed", type=int, help="Random seed for sampling (same seed, same output).")
def main(export_dir: Path, texts: tuple[str, ...], input_file: str | None, output: Path | None, as_json: bool,
         provider: str, threads: int | None, batch_size: int, truncate: bool, **generation: Any) -> None:
    """Generate with the model exported to EXPORT_DIR (by s2s-export or optimum-cli).

    TEXTS are inputs; without them, inputs are read from --input-file or stdin, one per line.
    Generation options default to the model's generation_config.json, as in transformers.
    """
    import runtime  # after argument parsing, so --help stays instant

    generation["early_stopping"] = _early_stopping(generation["early_stopping"])
    generation["eos_token_id"] = tuple(generation["eos_token_id"]) or None
    generation["bad_words_ids"] = _bad_words(generation["bad_words_ids"])
    inputs, from_file = _read_inputs(texts, input_file)
    target = _OutputFile(output) if output is not None else None  # fail on an unwritable -o before any work
    try:
        model = runtime.load(export_dir, provider=provider, threads=threads)
        click.echo(f"s2s-run: {model.provider_reason}", err=True)
        options = {k: v for k, v in generation.items() if v is not None}
        resolved = model.options(**options)  # fail on a bad option before any work
        started = time.perf_counter()
        results = _generate_all(model, inputs, options, resolved.num_return_sequences, batch_size, truncate,
                                show_bar=from_file and sys.stderr.isatty())
        elapsed = time.perf_counter() - started
        lines = _format(results, as_json)
        if target is None:
            for line in lines:
                click.echo(line)
        else:
            target.write(lines)
    finally:
        if target is not None:
            target.discard()
    click.echo(f"s2s-run: {len(inputs)} input(s) in {elapsed:.2f} s", err=True)


def _format(results: list[dict[str, Any]], as_json: bool) -> Iterator[str]:
    for result in results:
        if as_json:
            yield json.dumps(result, ensure_ascii=False)
        else:
            yield from result["outputs"]


def _generate_all(model: Any, inputs: list[str], options: dict[str, Any], per_input: int, batch_size: int,
                  truncate: bool, show_bar: bool) -> list[dict[str, Any]]:
    """Generate for every input, in batches of inputs of similar length; results in input order."""
    # group inputs of similar length (characters stand in for tokens) so batches pad less
    order = sorted(range(len(inputs)), key=lambda i: len(inputs[i])) if len(inputs) > batch_size \
        else list(range(len(inputs)))
    results: list[dict[str, Any]] = [{}] * len(inputs)
    with click.progressbar(length=len(inputs), label="generating", file=sys.stderr, hidden=not show_bar) as bar:
        for batch in _batches(order, batch_size):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                ids, mask = model.encode_text([inputs[i] for i in batch], truncate=truncate)
            for warning in caught:
                click.echo(f"s2s-run: warning: {warning.message}", err=True)
            generated = model.generate_with_scores(ids, mask, **options)
            decoded = model.text.decode(generated.sequences)
            for j, i in enumerate(batch):
                rows = slice(j * per_input, (j + 1) * per_input)
                results[i] = {
                    "input": inputs[i],
                    "outputs": decoded[rows],
                    "token_ids": generated.sequences[rows].tolist(),
                    "scores": generated.scores[rows].tolist() if generated.scores is not None else None,
                }
            bar.update(len(batch))
    return results


class _OutputFile:
    """-o FILE: a temp file beside it, created up front, renamed over it only when every result is in."""

    def __init__(self, path: Path):
        if path.is_dir():
            raise InvalidOptionError(f"--output {str(path)!r} is a directory; give a file path")
        directory = path.parent if str(path.parent) else Path(".")
        try:
            fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{path.name}.", suffix=".tmp")
        except OSError as err:
            raise InvalidOptionError(f"cannot write --output {str(path)!r}: {err.strerror}") from None
        os.close(fd)
        self.path, self.tmp = path, Path(tmp)

    def discard(self) -> None:
        """Remove the temp file if it is still there (the run failed before `write`)."""
        self.tmp.unlink(missing_ok=True)

    def write(self, lines: Iterator[str]) -> None:
        try:
            with self.tmp.open("w", encoding="utf-8") as handle:
                handle.writelines(line + "\n" for line in lines)
            os.replace(self.tmp, self.path)
        except OSError as err:
            raise InvalidOptionError(f"cannot write --output {str(self.path)!r}: {err.strerror}") from None
