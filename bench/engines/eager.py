"""Eager PyTorch, the baseline every speedup is against: transformers' `generate` on a transformers
checkpoint, or models/'s reference `generate` on a models/ checkpoint."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from bench.engines import set_torch_threads
from bench.sources import ModelSource


def unavailable(device: str) -> str | None:
    for package in ("torch", "transformers"):
        if importlib.util.find_spec(package) is None:
            return f"{package} is not installed (pip install 's2s[bench]')"
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            return f"this torch build ({torch.__version__}) has no usable CUDA device"
    return None


def precisions(device: str) -> tuple[str, ...]:
    # fp16 only where half-precision matmuls are fast; eager int8 (torch dynamic quantization) is not
    # what users run transformers with, so the baseline stays the model as loaded.
    return ("fp32", "fp16") if device == "cuda" else ("fp32",)


def prepare(source: ModelSource, precision: str, device: str, cache_dir: Path) -> Path:
    if source.checkpoint is None:
        raise LookupError("needs PyTorch weights; this model is an export directory only")
    return source.checkpoint


class EagerRunner:
    def __init__(self, source: ModelSource, device: str, precision: str, threads: int):
        import torch

        set_torch_threads(threads)
        self._torch = torch
        self._device = device
        self._source = source
        if source.checkpoint_format == "models":
            from models.checkpoint import load_checkpoint

            model = load_checkpoint(source.checkpoint).model
        else:
            from transformers import AutoModelForSeq2SeqLM

            model = AutoModelForSeq2SeqLM.from_pretrained(source.checkpoint).eval()
        if precision == "fp16":
            model = model.half()
        self._model = model.to(device)

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, num_beams: int,
                 new_tokens: int) -> np.ndarray:
        torch = self._torch
        ids = torch.from_numpy(input_ids).to(self._device)
        mask = torch.from_numpy(attention_mask).to(self._device)
        with torch.inference_mode():
            if self._source.checkpoint_format == "models":
                from models.generate import generate

                # no minimum-length rule there: rows stop at EOS (ModelSource.length_rule)
                out = generate(self._model, ids, mask, decoder_start_token_id=self._source.decoder_start_token_id,
                               eos_token_id=self._source.eos_token_id, pad_token_id=self._source.pad_token_id,
                               max_new_tokens=new_tokens, num_beams=num_beams)
            else:
                out = self._model.generate(input_ids=ids, attention_mask=mask, num_beams=num_beams, do_sample=False,
                                           min_new_tokens=new_tokens, max_new_tokens=new_tokens)
        return out.cpu().numpy()

    def sessions(self) -> dict[str, Any]:
        return {}


def load(artefact: Path, source: ModelSource, device: str, precision: str, threads: int) -> EagerRunner:
    return EagerRunner(source, device, precision, threads)
