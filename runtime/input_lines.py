"""s2s-run's inputs, read lazily: texts given as arguments, or lines of a file or stdin (plain text or JSON lines).

Each input becomes an `InputItem` that knows where it came from, so that an error names the line.
Blank lines at the very end of a file are ignored; a blank line anywhere else is an error naming it,
unless `skip_empty`, which makes it an item with nothing to generate (it still gets an empty answer,
so output line N stays the answer to input line N).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from runtime.errors import InvalidInputError

# What s2s-run adds to a JSON-lines record; an input record may not hold these already.
WRITTEN_FIELDS = ("outputs", "token_ids", "scores")


@dataclass(frozen=True, slots=True)  # slots: a window holds ten thousand of these
class InputItem:
    number: int  # its line of the file, or its place among the texts given as arguments
    source: str | None  # the file as errors name it ("'in.txt'", "stdin"); None: texts given as arguments
    text: str  # what to generate from; "" for a skipped empty input
    record: dict[str, Any] | None  # the JSON-lines object it came from (carried into the output); None: plain text
    skipped: bool  # an empty input kept only for its place (skip_empty)

    @property
    def where(self) -> str:
        """How an error names it: "line 7 of 'in.txt'", "input 2"."""
        return f"input {self.number}" if self.source is None else f"line {self.number} of {self.source}"

    @property
    def fields(self) -> dict[str, Any]:
        """What its output record starts with: the JSON-lines object it came from, or {"input": text}."""
        return {"input": self.text} if self.record is None else self.record


@dataclass(frozen=True)
class InputFormat:
    kind: str  # "text": one input per line; "jsonl": one JSON object per line, the text in `field`
    field: str = "text"
    skip_empty: bool = False
    written_fields: tuple[str, ...] = WRITTEN_FIELDS[:1]  # the fields the output adds (a record may not hold them)


def from_arguments(texts: Iterable[str]) -> Iterator[InputItem]:
    """Texts given on the command line: each must hold some text."""
    for number, text in enumerate(texts, start=1):
        if not text.strip():
            raise InvalidInputError(f"input {number} is empty; give every input some text")
        yield InputItem(number, None, text, None, False)


def from_lines(lines: Iterable[str], name: str, fmt: InputFormat) -> Iterator[InputItem]:
    """Lines of a file or stream (each with or without its newline) as items; `name` is how errors call
    the file ("'in.txt'", "stdin").

    Raises (while iterating):
        InvalidInputError: a blank line before the last non-blank one (without skip_empty), a line
            that is not a JSON object holding a string in `fmt.field`, or one that already holds a
            field the output writes; each names its line.
    """
    blank: list[int] = []  # blank lines not yet known to be trailing
    count = 0
    for number, line in enumerate(lines, start=1):
        line = line.rstrip("\r\n")
        if not line.strip():
            blank.append(number)
            continue
        for empty in blank:
            yield _empty(empty, name, fmt)
        blank.clear()
        item = _parse(line, number, name, fmt)
        count += 1
        yield item
    if count == 0:
        raise InvalidInputError(f"{name} holds no input lines")


def _empty(number: int, name: str, fmt: InputFormat) -> InputItem:
    if not fmt.skip_empty:
        raise InvalidInputError(f"line {number} of {name} is empty; remove it, give it text, or pass --skip-empty")
    # a blank line of a JSON-lines file carries no fields: its output record holds only what s2s-run writes
    return InputItem(number, name, "", {} if fmt.kind == "jsonl" else None, True)


def _parse(line: str, number: int, name: str, fmt: InputFormat) -> InputItem:
    if fmt.kind == "text":
        return InputItem(number, name, line, None, False)
    where = f"line {number} of {name}"
    try:
        record = json.loads(line)
    except ValueError as err:
        raise InvalidInputError(f"{where} is not JSON ({err}); --input-format jsonl wants one object per line") \
            from None
    if not isinstance(record, dict):
        raise InvalidInputError(f"{where} is a JSON {type(record).__name__}, not an object; "
                                "--input-format jsonl wants one object per line")
    text = record.get(fmt.field)
    if not isinstance(text, str):
        found = "has no such field" if fmt.field not in record else f"holds a {type(text).__name__}"
        raise InvalidInputError(f"{where}: the field {fmt.field!r} (--input-field) {found}; it must be a string")
    clash = [field for field in fmt.written_fields if field in record]
    if clash:
        raise InvalidInputError(f"{where} already has the field {clash[0]!r}, which s2s-run writes; rename it")
    if not text.strip():
        if not fmt.skip_empty:
            raise InvalidInputError(f"{where}: the field {fmt.field!r} is empty; give it text, or pass --skip-empty")
        return InputItem(number, name, "", record, True)
    return InputItem(number, name, text, record, False)
