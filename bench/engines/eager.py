"""Eager PyTorch: transformers' `generate` on the checkpoint, the baseline every speedup is against."""

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
        raise LookupError("needs a transformers checkpoint; this model is an export directory only")
    return source.checkpoint


class EagerRunner:
    def __init__(self, checkpoint: Path, device: str, precision: str, threads: int):
        import torch
        from transformers import AutoModelForSeq2SeqLM

        set_torch_threads(threads)
        self._torch = torch
        self._device = device
        model = AutoModelForSeq2SeqLM.from_pretrained(checkpoint).eval()
        if precision == "fp16":
            model = model.half()
        self._model = model.to(device)

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, num_beams: int,
                 new_tokens: int) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self._model.generate(
                input_ids=torch.from_numpy(input_ids).to(self._device),
                attention_mask=torch.from_numpy(attention_mask).to(self._device),
                num_beams=num_beams, do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens,
            )
        return out.cpu().numpy()

    def sessions(self) -> dict[str, Any]:
        return {}


def load(artefact: Path, source: ModelSource, device: str, precision: str, threads: int) -> EagerRunner:
    return EagerRunner(artefact, device, precision, threads)
