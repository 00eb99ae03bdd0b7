"""s2s-run: generate text with an exported model, from a few texts to files of millions of lines.

Texts come from arguments, from --input-file, or from stdin, one per line (or one JSON object per line
with --input-format jsonl), read lazily: memory grows with --window and the batch, never with the input.
Results come out in input order as soon as they are known: on stdout, or with -o FILE in FILE.partial
first (complete lines, resumable with --resume), renamed to FILE when every input is done. One line per
output, or one JSON object per input with --json (always with JSON-lines input).
"""

from __future__ import annotations

import json
import sys
import warnings
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from itertools import chain
from pathlib import Path
from typing import Any, TextIO

import click

from runtime.batching import DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_TOKENS, DEFAULT_WINDOW
from runtime.clickutil import S2SCommand
from runtime.errors import ExportDirError, InputItemError, InvalidInputError, InvalidOptionError
from runtime.input_lines import WRITTEN_FIELDS, InputFormat, InputItem, from_arguments, from_lines
from runtime.partial_file import ResultFile
from runtime.progress import Progress
from runtime.text_iter import InputsTruncatedWarning, TextGeneration
from runtime.window_tail import WindowTail

EPILOG = """\b
Examples:
  s2s-run out/t5 "translate English to German: Hello"
  s2s-run out/t5 --num-beams 4 --num-return-sequences 2 "summarize: ..."
  s2s-run out/t5 --input-file inputs.txt --json -o results.jsonl
  s2s-run out/t5 -i big.txt -o out.txt            # killed? the same command with --resume continues it
  s2s-run out/t5 -i data.jsonl --input-format jsonl --input-field text -o out.jsonl
  cat inputs.txt | s2s-run out/t5 --provider cuda
"""


def _early_stopping(value: str | None) -> bool | str | None:
    if value is None:
        return None
    values: dict[str, bool | str] = {"true": True, "false": False, "never": "never"}
    return values[value]


def _bad_words(value: str | None) -> list[list[int]] | None:
    """"3,4;7" -> [[3, 4], [7]]."""
    if value is None:
        return None
    try:
        return [[int(t) for t in group.split(",")] for group in value.split(";") if group.strip()]
    except ValueError:
        raise InvalidOptionError(f"--bad-words-ids {value!r}: expected token ids like '3,4;7'") from None


@click.command(cls=S2SCommand, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.argument("texts", nargs=-1)
@click.option("-i", "--input-file", help="Read inputs from this file, one per line ('-' for stdin).")
@click.option("--input-format", type=click.Choice(["text", "jsonl"]), default="text", show_default=True,
              help="text: each line is an input. jsonl: each line a JSON object, the input in --input-field; "
                   "its other fields are carried into the output object.")
@click.option("--input-field", help="With --input-format jsonl: the field holding the text.  [default: text]")
@click.option("--skip-empty", is_flag=True,
              help="Answer an empty input with empty output(s) instead of failing, so output lines stay aligned.")
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Write results to this file: to FILE.partial as they come, renamed to FILE when all are done.")
@click.option("--resume", is_flag=True,
              help="Continue the FILE.partial an earlier run with the same input and -o left (it is checked first).")
@click.option("--json", "as_json", is_flag=True,
              help="One JSON object per input: input, outputs, token_ids, scores (beam search).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Execution provider. auto = CUDA when it works, else CPU; cuda fails if CUDA cannot run.")
@click.option("--threads", type=click.IntRange(min=1), help="Intra-op threads per session (default: all cores).")
@click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULT_BATCH_SIZE, show_default=True,
              help="Most inputs generated together.")
@click.option("--max-batch-tokens", type=click.IntRange(min=0), default=DEFAULT_MAX_BATCH_TOKENS, show_default=True,
              help="Most padded source tokens in a batch (inputs x longest); 0 = no limit. A longer input runs alone.")
@click.option("--window", type=click.IntRange(min=1), default=DEFAULT_WINDOW, show_default=True,
              help="Inputs read ahead and sorted by length, so batches pad less; output keeps input order.")
@click.option("--truncate", is_flag=True,
              help="Cut inputs longer than the model's maximum (with a warning) instead of failing.")
@click.option("--num-beams", type=int, help="Beam width; 1 = greedy. Default: the model's generation_config.")
@click.option("--num-return-sequences", type=int, help="Outputs per input (<= --num-beams for beam search).")
@click.option("--max-new-tokens", type=int, help="Most tokens to generate (wins over --max-length).")
@click.option("--max-length", type=int, help="Most decoder tokens, the start token included.")
@click.option("--min-new-tokens", type=int, help="Fewest tokens to generate before EOS is allowed.")
@click.option("--min-length", type=int, help="Fewest decoder tokens (start token included) before EOS.")
@click.option("--length-penalty", type=float,
              help="Beam score = logprob sum / length**penalty; >0 favours long outputs.")
@click.option("--early-stopping", type=click.Choice(["true", "false", "never"]),
              help="Beam search stop rule, as in transformers.")
@click.option("--no-repeat-ngram-size", type=int, help="Never repeat an n-gram of this size; 0 = off.")
@click.option("--repetition-penalty", type=float, help="Penalise tokens already generated; 1.0 = off.")
@click.option("--bad-words-ids", help="Token id sequences never to generate, e.g. '3,4;7'.")
@click.option("--forced-bos-token-id", type=int, help="Token forced as the first generated token.")
@click.option("--forced-eos-token-id", type=int, help="Token forced when the maximum length is reached.")
@click.option("--decoder-start-token-id", type=int, help="Token the decoder starts from (default: the model's).")
@click.option("--eos-token-id", type=int, multiple=True,
              help="End-of-sequence token (repeat for several); default: the model's.")
@click.option("--pad-token-id", type=int, help="Token that fills finished sequences; default: the model's.")
@click.option("--do-sample/--no-do-sample", default=None,
              help="Sample instead of greedy/beam decoding (num_beams must be 1). "
                   "Default: the model's generation_config.")
@click.option("--temperature", type=float, help="Sampling temperature; 1.0 = unchanged.")
@click.option("--top-k", type=int, help="Sample among the k most likely tokens; 0 = off.")
@click.option("--top-p", type=float,
              help="Sample among the smallest set of tokens with this total probability; 1.0 = off.")
@click.option("--seed", type=int, help="Random seed for sampling (same seed, same output).")
def main(export_dir: Path, texts: tuple[str, ...], input_file: str | None, input_format: str,
         input_field: str | None, skip_empty: bool, output: Path | None, resume: bool, as_json: bool, provider: str,
         threads: int | None, batch_size: int, max_batch_tokens: int, window: int, truncate: bool,
         **generation: Any) -> None:
    """Generate with the model exported to EXPORT_DIR (by s2s-export or optimum-cli).

    TEXTS are inputs; without them, inputs are read from --input-file or stdin, one per line.
    Generation options default to the model's generation_config.json, as in transformers.
    """
    import runtime  # after argument parsing, so --help stays instant

    generation["early_stopping"] = _early_stopping(generation["early_stopping"])
    generation["eos_token_id"] = tuple(generation["eos_token_id"]) or None
    generation["bad_words_ids"] = _bad_words(generation["bad_words_ids"])
    if input_field is not None and input_format != "jsonl":
        raise InvalidOptionError("--input-field names a field of --input-format jsonl; pass that too, or drop it")
    if resume and output is None:
        raise InvalidOptionError("--resume continues the FILE.partial of -o FILE; pass -o")
    fmt = InputFormat(input_format, input_field or "text", skip_empty,
                      WRITTEN_FIELDS if as_json else WRITTEN_FIELDS[:1])
    items, total = _inputs(texts, input_file, fmt)  # a file is read through once here: its errors come first
    target, done, again = _open_output(output, resume, items, fmt, window)
    json_out = as_json or input_format == "jsonl"
    try:
        model = runtime.load(export_dir, provider=provider, threads=threads)
        if not isinstance(model, runtime.Model):
            raise ExportDirError(f"{export_dir!r} holds a {model.manifest.kind} model; s2s-run generates text with "
                                 "encoder-decoder exports")
        click.echo(f"s2s-run: {model.provider_reason}", err=True)
        options = {k: v for k, v in generation.items() if v is not None}
        per_input = model.options(**options).num_return_sequences  # fail on a bad option before any work
        if done and target is not None:
            click.echo(f"s2s-run: resuming {str(target.partial)!r}: {done} input(s) done"
                       + (f"; the last {len(again)} run again with the rest of their window, so that its batches "
                          "are those of one uninterrupted run" if again else ""), err=True)
        pending = _Pending(chain(again, items), written_through=again[-1].number if again else 0)
        results = model.generate_text_iter_with_scores(
            pending.texts(), batch_size=batch_size, max_batch_tokens=max_batch_tokens or None, window=window,
            truncate=truncate, **options)
        with Progress(None if total is None else total - done, show=sys.stderr.isatty()) as progress, \
                pending.warnings_to_stderr():
            for item, result in pending.answer(results):
                _emit(_record(item, result, per_input, with_ids=as_json), target, json_out)
                progress.update(1, 0 if result is None else result.generated_tokens)
        if target is not None:
            target.finish(as_text=not json_out)
    except BaseException:
        if target is not None:
            target.abandon()
            if target.partial.exists():
                click.echo(f"s2s-run: {str(target.partial)!r} keeps the results so far; "
                           "the same command with --resume continues it", err=True)
        raise
    click.echo(f"s2s-run: {progress.summary()}", err=True)


# The options that do not shape the bytes s2s-run writes: where the input and the output are, and how fast it
# runs. Every other option is recorded with a partial, so that --resume continues it only with the same ones.
_NOT_RECORDED = frozenset({"input_file", "output", "resume", "provider", "threads"})
# Flags --resume may turn on: each changes only the answer to an input that stops a run without it (an empty
# line, a too-long one), and it stops before that input's window runs, so no such input is in the partial.
_MAY_TURN_ON = ("--skip-empty", "--truncate")


def _recorded_options() -> dict[str, Any]:
    """The options of this command that shape its output, by long flag, as given (defaults included)."""
    context = click.get_current_context()
    return {max(param.opts, key=len): context.params[param.name] for param in context.command.params
            if isinstance(param, click.Option) and param.name is not None and param.name not in _NOT_RECORDED}


def _open_output(output: Path | None, resume: bool, items: Iterator[InputItem], fmt: InputFormat,
                 window: int) -> tuple[ResultFile | None, int, list[InputItem]]:
    """-o FILE's partial, started or resumed; how many inputs are done; and the done ones to run again.

    Resuming consumes the done inputs from `items`. Those of the window in progress are run again (their
    results dropped), so the resumed run's windows and batches fall where an uninterrupted run's would
    (runtime/window_tail.py): with sampling or beam scores, the bytes written depend on them.
    """
    if output is None:
        return None, 0, []
    target = ResultFile(output)
    if resume and target.partial.exists():
        reader = WindowTail(items, window)
        done = target.resume(iter(reader), fmt.written_fields, _recorded_options(), may_turn_on=_MAY_TURN_ON)
        return target, done, reader.tail()
    if resume:
        click.echo(f"s2s-run: no {str(target.partial)!r} to resume; starting from the first input", err=True)
    target.start(_recorded_options())
    return target, 0, []


def _emit(record: dict[str, Any], target: ResultFile | None, json_out: bool) -> None:
    if target is not None:
        target.append(record)
    elif json_out:
        click.echo(json.dumps(record, ensure_ascii=False))
    else:
        for line in record["outputs"]:
            click.echo(line)


def _inputs(texts: tuple[str, ...], input_file: str | None, fmt: InputFormat) -> tuple[Iterator[InputItem], int | None]:
    """The inputs, lazily, and how many there are (None for stdin, which cannot be read twice).

    A file is read through once first, so that a bad line (empty, not JSON) fails before any work."""
    if texts and input_file:
        raise InvalidOptionError("give texts as arguments or with --input-file, not both")
    if texts:
        if fmt.kind != "text":
            raise InvalidOptionError("--input-format jsonl reads --input-file or stdin, not texts given as arguments")
        return from_arguments(texts), len(texts)
    if input_file is None:
        if sys.stdin is None or sys.stdin.isatty():
            raise InvalidInputError("no input: give texts as arguments, --input-file FILE, or pipe lines into stdin")
        input_file = "-"
    if input_file == "-":
        return from_lines(_read_lines("-"), "stdin", fmt), None
    name = repr(input_file)
    total = sum(1 for _ in from_lines(_read_lines(input_file), name, fmt))
    return from_lines(_read_lines(input_file), name, fmt), total


def _read_lines(input_file: str) -> Iterator[str]:
    """The lines of a file ('-': stdin), UTF-8, opened at once (a missing file fails here) and read lazily."""
    what = "stdin" if input_file == "-" else f"--input-file {input_file!r}"
    try:
        handle = click.open_file(input_file, "r", encoding="utf-8")
    except OSError as err:
        raise InvalidInputError(f"cannot read {what}: {err.strerror}") from None

    def lines() -> Iterator[str]:
        with handle:
            try:
                yield from handle
            except UnicodeDecodeError as err:
                raise InvalidInputError(f"cannot read {what}: it is not UTF-8 ({err.reason})") from None
            except OSError as err:
                raise InvalidInputError(f"cannot read {what}: {err.strerror}") from None

    return lines()


class _Pending:
    """Inputs read but not answered yet, in input order (at most a window and a batch of them).

    They carry skipped and JSON-lines inputs to their output, and map the positions the model names
    (among the texts it was given) back to lines. written_through: the number (`InputItem.number`) of
    the last input already written, by the run a resumed one continues: inputs up to it run again only
    for their window's sake, so their answers and warnings are dropped.
    """

    def __init__(self, items: Iterator[InputItem], written_through: int = 0):
        self._items = items
        self._written_through = written_through
        self._queue: deque[InputItem] = deque()
        self._answered = 0  # texts the model has answered

    def texts(self) -> Iterator[str]:
        """The texts for the model, read as it asks for them."""
        for item in self._items:
            self._queue.append(item)
            if not item.skipped:
                yield item.text

    def answer(self, results: Iterable[TextGeneration]) -> Iterator[tuple[InputItem, TextGeneration | None]]:
        """Each input not written yet with its result (None for a skipped one), in input order."""
        return ((item, result) for item, result in self._answers(results) if item.number > self._written_through)

    def _answers(self, results: Iterable[TextGeneration]) -> Iterator[tuple[InputItem, TextGeneration | None]]:
        try:
            for result in results:
                while self._queue[0].skipped:
                    yield self._queue.popleft(), None
                self._answered += 1
                yield self._queue.popleft(), result
        except InputItemError as err:
            raise InvalidInputError(f"{self._given([err.index])[0].where} {err.problem}") from None
        while self._queue:  # skipped inputs after the last text
            yield self._queue.popleft(), None

    @contextmanager
    def warnings_to_stderr(self) -> Iterator[None]:
        """While the model runs, each warning is one line on stderr, at once, naming lines."""
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = self._show_warning
            yield

    def _show_warning(self, message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: TextIO | None = None, line: str | None = None) -> None:
        if isinstance(message, InputsTruncatedWarning):
            for item in self._given(message.indices):
                if item.number <= self._written_through:
                    continue  # warned about by the run that wrote it
                click.echo(f"s2s-run: warning: {item.where} is longer than {message.limit} tokens and was truncated",
                           err=True)
        else:
            click.echo(f"s2s-run: warning: {message}", err=True)

    def _given(self, indices: Sequence[int]) -> list[InputItem]:
        """The inputs behind the model's texts `indices` (0-based among the texts given to it)."""
        waiting = [item for item in self._queue if not item.skipped]
        return [waiting[index - self._answered] for index in indices]


def _record(item: InputItem, result: TextGeneration | None, per_input: int, with_ids: bool) -> dict[str, Any]:
    """An input's output record: its fields, its outputs, and with_ids its token ids and beam scores."""
    record = dict(item.fields)
    record["outputs"] = [""] * per_input if result is None else result.texts
    if with_ids:
        record["token_ids"] = [[] for _ in range(per_input)] if result is None else \
            [ids.tolist() for ids in result.token_ids]
        record["scores"] = None if result is None or result.scores is None else result.scores.tolist()
    return record
