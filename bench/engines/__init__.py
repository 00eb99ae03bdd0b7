"""The engines s2s-bench compares, one module each, all with the same module-level interface:

    unavailable(device) -> str | None
        Why the engine cannot run on "cpu" / "cuda" here (a package or provider missing), or None.
    precisions(device) -> tuple[str, ...]
        The precisions ("fp32", "int8", "fp16") it runs on that device.
    prepare(source, precision, device, cache_dir) -> Path
        Build (once, cached) the files it loads: an export, a converted model. Runs in the parent
        process, which may import torch; the measured worker process only loads.
    load(artefact, source, device, precision, threads) -> Runner
        In the worker process: load with `threads` intra-op threads.
An engine that cannot serve a model/precision raises LookupError from `prepare`, saying why; the
report lists the combination as skipped with that reason.

Every runner returns the same thing for the same work, so tokens can be compared across engines:
    generate(input_ids, attention_mask, num_beams, new_tokens) -> [batch, 1 + generated] int64,
    the decoder start token first (transformers' layout), pad after a row's EOS; generated is
    exactly new_tokens under the source's "min_new_tokens" length rule (see ModelSource.length_rule).
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

import numpy as np

# name in the report -> module; the order is the table's order (eager first: it is the baseline).
ENGINES = {
    "eager": "bench.engines.eager",
    "s2s": "bench.engines.s2s",
    "optimum": "bench.engines.optimum",
    "ct2": "bench.engines.ct2",
}
BASELINE = "eager"
PRECISIONS = ("fp32", "int8", "fp16")


class Runner(Protocol):
    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, num_beams: int,
                 new_tokens: int) -> np.ndarray:
        """input_ids, attention_mask: [batch, src_len] int64 -> [batch, 1 + generated] int64."""

    def sessions(self) -> dict[str, Any]:
        """The onnxruntime InferenceSessions it runs, by graph name (for --breakdown); {} if none."""


def engine(name: str) -> ModuleType:
    return importlib.import_module(ENGINES[name])


def cache_path(cache_dir: Path, engine_name: str, checkpoint: Path, *variant: str) -> Path:
    """Where an engine keeps what it built from `checkpoint`: named after the checkpoint directory and
    keyed by its path and its files' sizes and times, so a retrained or different model of the same
    name is never served a stale build."""
    digest = hashlib.sha256(str(checkpoint.resolve()).encode())
    for path in sorted(checkpoint.iterdir()):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_dir / "artefacts" / engine_name / "-".join((checkpoint.name, digest.hexdigest()[:10], *variant))


def set_torch_threads(threads: int) -> None:
    """Give torch the same intra-op thread count as every other engine, and one inter-op thread."""
    import torch

    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != 1:  # settable once per process, before any parallel work
        torch.set_num_interop_threads(1)
