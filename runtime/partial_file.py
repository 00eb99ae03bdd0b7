"""`s2s-run -o FILE`: results go to FILE.partial as they come; FILE appears only when every one is in.

Each result is one JSON line, written whole and flushed at once, so a run killed at any moment (kill -9)
leaves no new FILE and a FILE.partial of complete lines, at most a torn last one. Every line holds its
input beside its outputs (the input's fields, then "outputs", ...), so `--resume` can check that the
partial belongs to the inputs it is given before it continues. At the end the partial is renamed to
FILE (JSON output), or, for plain-text output, FILE is written from it (the outputs alone) and renamed
into place, and the partial removed.

Beside the partial, FILE.partial.options records the options that shape what is written (s2s-run's
choice: --json, the generation options, the batch limits, ...), by flag. `--resume` with other ones is
refused, except for flags the caller lets be turned on (then the record is updated). The export itself is
not recorded: resume with the model the run started with.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import IO, Any

from runtime.errors import InvalidInputError, InvalidOptionError
from runtime.input_lines import InputItem
from runtime.json_file import read_json_object

SUFFIX = ".partial"
OPTIONS_SUFFIX = ".options"  # after SUFFIX: FILE.partial.options


class ResultFile:
    """The partial and the final file of one `-o FILE`. Raises InvalidOptionError (an unusable path)."""

    def __init__(self, path: Path):
        if path.is_dir():
            raise InvalidOptionError(f"--output {str(path)!r} is a directory; give a file path")
        directory = path.parent if str(path.parent) else Path(".")
        if not directory.is_dir() or not os.access(directory, os.W_OK | os.X_OK):
            raise InvalidOptionError(f"cannot write --output {str(path)!r}: {str(directory)!r} is not a writable "
                                     "directory")
        self.path = path
        self.partial = path.with_name(path.name + SUFFIX)
        self.options_file = path.with_name(path.name + SUFFIX + OPTIONS_SUFFIX)
        self._handle: IO[str] | None = None
        self._fresh = False  # created by this run (so removed again if the run ends with nothing in it)

    def start(self, options: dict[str, Any]) -> None:
        """Create the partial for a fresh run, and record `options` beside it.

        options: what shapes the output, by flag ({"--json": False, "--num-beams": 4, ...}), JSON values.
        Raises:
            InvalidOptionError: it exists already (an earlier run stopped), or cannot be created.
        """
        try:
            self._handle = self.partial.open("x", encoding="utf-8", newline="\n")
        except FileExistsError:
            raise InvalidOptionError(f"{str(self.partial)!r} exists, left by a run that stopped; pass --resume to "
                                     "continue it, or delete it") from None
        except OSError as err:
            raise InvalidOptionError(f"cannot write {str(self.partial)!r}: {err.strerror}") from None
        self._fresh = True
        try:
            self._record_options(options)  # after the partial: an existing one's record is never overwritten
        except InvalidOptionError:
            self.abandon()
            raise

    def resume(self, items: Iterator[InputItem], written_fields: tuple[str, ...], options: dict[str, Any],
               may_turn_on: Collection[str] = ()) -> int:
        """Continue the partial: check that it was made with `options` and that its results answer the
        first inputs of `items` (consuming them), drop a torn last line, and open it for appending.
        Returns how many inputs are done.

        written_fields: the fields a record adds to its input's (the rest must equal `item.fields`).
        options: as `start`'s; they must equal the recorded ones, but a flag of `may_turn_on` recorded
            False may now be True (the record then says True).
        Raises (leaving the partial and its record as they were):
            InvalidOptionError: the options differ from the recorded ones, or there is no readable record.
            InvalidInputError: a line is not a result record, or the results are for other inputs
                (different ones, or more than `items` holds).
        """
        options = _as_json(options)
        turned_on = self._check_options(options, may_turn_on)
        done = 0
        complete_bytes = 0  # the partial up to the end of its last complete line
        with self.partial.open("rb") as handle:
            for raw in handle:
                if not raw.endswith(b"\n"):
                    break  # torn: the last line, cut short by a kill mid-write
                record = self._record(raw, done + 1)
                item = next(items, None)
                if item is None:
                    raise InvalidInputError(f"--resume: {str(self.partial)!r} holds more results than there are "
                                            f"inputs ({done}); pass the input it was made from, or delete it")
                answered = {key: value for key, value in record.items() if key not in written_fields}
                if answered != item.fields:
                    raise InvalidInputError(
                        f"--resume: {str(self.partial)!r} was made from other inputs: its result {done + 1} answers "
                        f"{_short(answered)}, but {item.where} is {_short(item.fields)}; pass the input it was made "
                        "from, or delete it")
                done += 1
                complete_bytes += len(raw)
        if turned_on:
            self._record_options(options)
        try:
            if self.partial.stat().st_size > complete_bytes:
                os.truncate(self.partial, complete_bytes)
            self._handle = self.partial.open("a", encoding="utf-8", newline="\n")
        except OSError as err:
            raise InvalidOptionError(f"cannot write {str(self.partial)!r}: {err.strerror}") from None
        return done

    def append(self, record: dict[str, Any]) -> None:
        """Write one result line whole and flush it (a kill after this call keeps it)."""
        assert self._handle is not None, "start() or resume() first"
        self._handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._handle.flush()

    def finish(self, as_text: bool) -> None:
        """Every result is in: make FILE (the records as they are, or with as_text their outputs, one
        per line) and remove the partial."""
        assert self._handle is not None, "start() or resume() first"
        self._close(sync=True)
        try:
            if not as_text:
                os.replace(self.partial, self.path)
                self.options_file.unlink(missing_ok=True)
                return
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as out, self.partial.open("rb") as records:
                    for raw in records:
                        out.writelines(text + "\n" for text in json.loads(raw)["outputs"])
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self.partial.unlink()
            self.options_file.unlink(missing_ok=True)
        except OSError as err:
            raise InvalidOptionError(f"cannot write --output {str(self.path)!r}: {err.strerror}") from None

    def abandon(self) -> None:
        """The run stopped before the end: keep the partial for --resume, unless this run created it and
        wrote nothing to it (nothing to resume)."""
        if self._handle is None:
            return
        empty = self._handle.tell() == 0
        self._close(sync=False)
        if empty and self._fresh:
            self.partial.unlink(missing_ok=True)
            self.options_file.unlink(missing_ok=True)

    def _close(self, sync: bool) -> None:
        assert self._handle is not None
        self._handle.flush()
        if sync:  # FILE is meant to outlive a crash of the machine too, not only of this process
            os.fsync(self._handle.fileno())
        self._handle.close()
        self._handle = None

    def _record_options(self, options: dict[str, Any]) -> None:
        """Write the record of options whole (a temp file renamed over it), synced before the partial gets a line."""
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.options_file.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as out:
                out.write(json.dumps(_as_json(options), ensure_ascii=False, indent=1) + "\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.options_file)
        except OSError as err:
            Path(tmp).unlink(missing_ok=True)
            raise InvalidOptionError(f"cannot write {str(self.options_file)!r}: {err.strerror}") from None

    def _check_options(self, options: dict[str, Any], may_turn_on: Collection[str]) -> bool:
        """Whether `options` turn on a flag of may_turn_on; raises InvalidOptionError (naming every
        difference) if they differ from the record otherwise, or there is no readable record."""
        fix = f"so the options {str(self.partial)!r} was made with are unknown; delete the partial to start again"
        if not self.options_file.exists():
            raise InvalidOptionError(f"--resume: {str(self.options_file)!r} is missing, {fix}")
        recorded = read_json_object(self.options_file, InvalidOptionError, f"--resume: {fix}")
        changed = [key for key in {**recorded, **options}
                   if recorded.get(key, _UNRECORDED) != options.get(key, _UNRECORDED)]
        differ = [key for key in changed
                  if not (key in may_turn_on and recorded.get(key) is False and options.get(key) is True)]
        if differ:
            changes = "; ".join(f"{key}: {_shown(recorded.get(key, _UNRECORDED))} then, "
                                f"{_shown(options.get(key, _UNRECORDED))} now" for key in differ)
            raise InvalidOptionError(f"--resume: {str(self.partial)!r} was made with other options ({changes}); "
                                     "pass the options it was made with, or delete it")
        return bool(changed)

    def _record(self, raw: bytes, number: int) -> dict[str, Any]:
        try:
            record = json.loads(raw)
        except ValueError:
            record = None
        if not isinstance(record, dict) or not isinstance(record.get("outputs"), list):
            raise InvalidInputError(f"--resume: line {number} of {str(self.partial)!r} is not an s2s-run result; "
                                    "delete the file to start again")
        return record


_UNRECORDED = object()  # a flag one side has and the other not (another version of s2s-run)


def _as_json(options: dict[str, Any]) -> dict[str, Any]:
    """options as they read back from the record (tuples become lists)."""
    return json.loads(json.dumps(options))


def _shown(value: Any) -> str:
    """A recorded option as the refusal names it: on, off, default (not given), not recorded, or its JSON."""
    if value is _UNRECORDED:
        return "not recorded"
    names = {True: "on", False: "off", None: "default"}
    return names[value] if isinstance(value, bool) or value is None else json.dumps(value, ensure_ascii=False)


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."
