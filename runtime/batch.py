"""Batch inference over batches of columns: `TextGenerator`, a callable class for Ray Data's `map_batches`.

    import ray
    from runtime.batch import TextGenerator

    ds = ray.data.read_json("docs.jsonl")                  # rows {"id": ..., "text": ...}
    ds = ds.map_batches(TextGenerator, fn_constructor_kwargs={"export_dir": "out/t5", "threads": 1,
                                                              "max_new_tokens": 60},
                        batch_size=64, concurrency=2, num_cpus=1)
    ds.write_json("out/")                                   # rows {"id", "text", "generated_text"}

Each instance loads the model once (in `__init__`), so `concurrency=N` runs N actors each holding one
model, and every call generates for one batch of rows. Plain Python over `runtime.Model`: it imports
neither ray nor torch nor pandas, and works with any engine that calls a function on batches (a dict of
column arrays, or a pandas DataFrame when the engine passes one).

A batch's rows are sorted by length and generated in sub-batches of at most the runtime's padded-token
budget (`Model.generate_text_iter`), so the rows of one batch pad little. With greedy or beam search,
batching does not change a row's tokens: each row gets what `Model.generate_text` gives its text alone.
Seeded sampling draws per sub-batch, so a row's draws depend on the rows it shares its batch with (the
engine's batch boundaries included); the same rows in one batch draw the same again (a retried batch).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from runtime.batching import DEFAULT_MAX_BATCH_TOKENS
from runtime.errors import ExportDirError, InputItemError, InvalidInputError
from runtime.model import Model, load


class TextGenerator:
    """Adds generated text to batches of rows: `batch[output_column]` from `batch[input_column]`.

    export_dir: an export directory (written by s2s-export), readable from wherever the instance is
        built (on a cluster: the same path on every node, or shared storage).
    input_column: the column holding the input texts (str).
    output_column: the column added (replaced if present); with `num_return_sequences > 1` each row
        holds a list of that many texts, best first.
    provider, threads: as `runtime.load` (give `threads` the cores each instance may use).
    truncate: cut inputs longer than the model's maximum instead of failing the batch.
    generation_options: `generate`'s keyword arguments (num_beams, max_new_tokens, ...), checked here.

    Raises:
        ExportDirError, ManifestVersionError: the directory is not an encoder-decoder export.
        ProviderUnavailableError: provider="cuda" where CUDA cannot run.
        InvalidOptionError: a generation option is invalid.
    """

    def __init__(self, export_dir: str | Path, *, input_column: str = "text", output_column: str = "generated_text",
                 provider: str = "auto", threads: int | None = None, truncate: bool = False,
                 **generation_options: Any):
        model = load(export_dir, provider=provider, threads=threads)
        if not isinstance(model, Model):
            raise ExportDirError(f"{str(export_dir)!r} holds a {model.manifest.kind} model; TextGenerator "
                                 "generates text with encoder-decoder exports")
        self.model = model
        self.input_column = input_column
        self.output_column = output_column
        self.truncate = truncate
        self.generation_options = generation_options
        self.model.options(**generation_options)  # a bad option fails here, where the instance is built

    def __call__(self, batch: Any) -> Any:
        """batch: a dict of column arrays (each [rows]), or a pandas DataFrame. Returns the same kind with
        every column passed through (ids survive) and `output_column` added: [rows] object (str, or a
        list of str per row with num_return_sequences > 1) for a dict, a column of the same for a DataFrame.

        Raises:
            InvalidInputError: the batch is of another kind or lacks `input_column`, or a row's input is
                not a non-empty str (or is too long, without truncate); the message names the row.
        """
        if isinstance(batch, Mapping):
            results = self._generate(batch, list(batch))
            column = np.empty(len(results), dtype=object)  # filled one by one: lists must not become a 2-D array
            for row, result in enumerate(results):
                column[row] = result
            return {**batch, self.output_column: column}
        if _is_dataframe(batch):
            return batch.assign(**{self.output_column: self._generate(batch, list(batch.columns))})
        raise InvalidInputError(f"a batch must be a dict of column arrays or a pandas DataFrame, got "
                                f"{type(batch).__name__}; with Ray Data pass batch_format='numpy' or 'pandas'")

    def _generate(self, batch: Any, columns: list[Any]) -> list[str | list[str]]:
        """One result per row of batch[input_column], in row order."""
        if self.input_column not in columns:
            raise InvalidInputError(f"the batch has no column {self.input_column!r} (columns: {columns}); "
                                    "pass input_column=... naming the column of input texts")
        texts = list(batch[self.input_column])
        for row, text in enumerate(texts):
            if not isinstance(text, str):  # None, NaN, bytes: the tokenizer would fail without naming the row
                raise InvalidInputError(f"column {self.input_column!r}, row {row} of the batch: expected a str, "
                                        f"found {type(text).__name__} {text!r}")
        try:
            return list(self.model.generate_text_iter(texts, batch_size=max(len(texts), 1),
                                                      max_batch_tokens=DEFAULT_MAX_BATCH_TOKENS,
                                                      window=max(len(texts), 1), truncate=self.truncate,
                                                      **self.generation_options))
        except InputItemError as err:
            raise InvalidInputError(f"column {self.input_column!r}, row {err.index} of the batch {err.problem}") \
                from None


def _is_dataframe(batch: Any) -> bool:
    """Whether batch is a pandas DataFrame, without importing pandas (only a caller that has it can pass one)."""
    pandas = sys.modules.get("pandas")
    return pandas is not None and isinstance(batch, pandas.DataFrame)
