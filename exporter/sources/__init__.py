"""Where an export starts: a checkpoint directory, and the PyTorch model it holds.

`load_source(path)` picks the source by what the directory contains:
- `config.json` of a transformers encoder-decoder (written by `save_pretrained`) -> `hf.load_source`
  (optimum's exporter; no code per architecture);
- `s2s_model.json` (a models/ checkpoint) -> `custom.load_source`.

A source module provides `load_source(path: Path) -> Source`. The pipeline (exporter/api.py) then
calls, in order: `export_graphs`, the passes on the graph files its manifest names, `finish`, and
validation against `reference()` on `sample_inputs()`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Protocol

import numpy as np

from exporter.errors import SourceModelError
from exporter.progress import Steps
from runtime.errors import UnsupportedModelError
from runtime.manifest import Manifest

HF_CONFIG = "config.json"
CUSTOM_CHECKPOINT = "s2s_model.json"


class TorchReference(Protocol):
    """The PyTorch model, as validation compares against it (float32, eval mode)."""

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                decoder_input_ids: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """Teacher-forced, without a cache. input_ids, attention_mask: [batch, src_len] int64;
        decoder_input_ids: [batch, tgt_len] int64, decoder start token first.

        Returns the encoder's last_hidden_state [batch, src_len, hidden] float32 (None if the encoder
        graph has no such output) and the logits [batch, tgt_len, vocab] float32.
        """

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int) -> np.ndarray:
        """Greedy search with the model's generation defaults (num_beams=1, no sampling).

        Returns [batch, length] int64, decoder start token first, pad after EOS (like `generate`).
        """


class Source(Protocol):
    """One checkpoint being exported."""

    kind: str  # the manifest's `source`: "hf" or "custom"
    model_type: str  # the manifest's `model_type`; error messages name it

    def export_graphs(self, out_dir: Path, opset: int | None, steps: Steps) -> Manifest:
        """Write the fp32 graphs into out_dir (the layout the passes work on) and return their manifest.

        Every graph file the manifest names is one the passes may rewrite in place. `steps.start(name)`
        reports sub-steps (one per graph) to the user.
        """

    def finish(self, out_dir: Path, notes: list[str]) -> Manifest:
        """After the passes: assemble the final layout (e.g. move cross-attention K/V into the encoder,
        merge decoders) and write the config and tokenizer files if export_graphs did not. Appends to
        `notes` what the user should know about the layout (e.g. why a preferred one was not used).
        Returns the manifest; the pipeline then fills in source, precision, passes and versions."""

    def reference(self) -> TorchReference:
        """The model validation compares the graphs against."""

    def sample_inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """input_ids, attention_mask: [2, src_len] int64, rows of different lengths padded on the right
        (the model's own tokenizer on two sentences where it has one, random ids otherwise)."""


def load_source(model_dir: Path) -> Source:
    """The source for a checkpoint directory, picked by what it contains.

    Raises:
        SourceModelError: the directory holds no checkpoint s2s-export reads, or it is unreadable.
        UnsupportedModelError: the checkpoint is not an encoder-decoder this tool exports.
    """
    if (model_dir / CUSTOM_CHECKPOINT).is_file():
        try:
            custom = importlib.import_module("exporter.sources.custom")
        except ModuleNotFoundError as err:
            if err.name != "exporter.sources.custom":
                raise
            raise UnsupportedModelError(
                f"{str(model_dir)!r} is a models/ checkpoint ({CUSTOM_CHECKPOINT}), but this installation has no "
                "exporter for them (exporter/sources/custom.py is missing); reinstall s2s"
            ) from None
        return custom.load_source(model_dir)
    if (model_dir / HF_CONFIG).is_file():
        from exporter.sources import hf

        return hf.load_source(model_dir)
    raise SourceModelError(
        f"{str(model_dir)!r} holds no model: expected {HF_CONFIG} (a directory written by transformers' "
        f"save_pretrained) or {CUSTOM_CHECKPOINT} (a models/ checkpoint); found "
        f"{sorted(p.name for p in model_dir.iterdir())[:10] or 'an empty directory'}"
    )
