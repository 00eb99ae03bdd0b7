"""The s2s runtime on an export written by s2s-export (CPU, or CUDA where its provider works)."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench.engines import cache_path
from bench.sources import REPO_ROOT, ModelSource

# What the exporter is asked for, per precision (fp16 is for CUDA; int8 dynamic quantization for CPU).
EXPORT_OPTIONS = {"fp32": {}, "int8": {"quantize": "int8"}, "fp16": {"dtype": "fp16"}}


def unavailable(device: str) -> str | None:
    import onnxruntime as ort

    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime build has no CUDA provider (install onnxruntime-gpu)"
    return None  # a CUDA provider that is listed but cannot start is reported by load()


def precisions(device: str) -> tuple[str, ...]:
    return ("fp32", "fp16") if device == "cuda" else ("fp32", "int8")


def _exporter_fingerprint() -> str:
    """Changes whenever the exporter or the manifest contract changes, so stale exports are rebuilt."""
    digest = hashlib.sha256()
    files = sorted((REPO_ROOT / "exporter").rglob("*.py")) + [REPO_ROOT / "runtime" / "manifest.py"]
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def prepare(source: ModelSource, precision: str, device: str, cache_dir: Path, optimize: bool = False) -> Path:
    if source.export_dir is not None and source.export_precision == precision:
        return source.export_dir
    if source.checkpoint is None:
        raise LookupError(f"the export directory is {source.export_precision}, "
                          f"and there is no checkpoint to export {precision} from")
    variant = (precision, "opt") if optimize else (precision,)
    target = cache_path(cache_dir, "s2s", source.checkpoint, *variant, _exporter_fingerprint())
    if (target / "s2s.json").is_file():
        return target
    from exporter import export

    shutil.rmtree(target, ignore_errors=True)  # a leftover of an interrupted export
    target.parent.mkdir(parents=True, exist_ok=True)
    # validate=False: the bench compares every engine's tokens with eager PyTorch anyway.
    export(source.checkpoint, target, optimize=optimize, validate=False, **EXPORT_OPTIONS[precision])
    return target


class S2SRunner:
    def __init__(self, export_dir: Path, device: str, threads: int, length_rule: str):
        import runtime

        self.model = runtime.load(export_dir, provider=device, threads=threads)
        self._length_rule = length_rule  # see ModelSource.length_rule

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, num_beams: int,
                 new_tokens: int) -> np.ndarray:
        minimum = new_tokens if self._length_rule == "min_new_tokens" else None
        return self.model.generate(input_ids, attention_mask, num_beams=num_beams, max_new_tokens=new_tokens,
                                   min_new_tokens=minimum)

    def stream(self, input_ids: np.ndarray, attention_mask: np.ndarray, new_tokens: int) -> Iterator[np.ndarray]:
        """Greedy, one step per next(): [batch] int64 each (runtime's Model.stream), the same length rule
        as generate. The encoder runs in this call; the k-th next() runs the decoder at past length k - 1."""
        minimum = new_tokens if self._length_rule == "min_new_tokens" else None
        return self.model.stream(input_ids, attention_mask, max_new_tokens=new_tokens, min_new_tokens=minimum)

    def sessions(self) -> dict[str, Any]:
        from runtime.sessions import Graph

        # Every graph the loaded model holds (encoder, decoder, first_step when present, and any
        # graph added later), by attribute name, and the helper graphs of runtime/tensor_ops.py the
        # warm-up calls created (beam reorders, log-softmax, top-k), so no session.run escapes the breakdown.
        graphs = self.model.graphs
        found = {name: graph.session for name, graph in vars(graphs).items() if isinstance(graph, Graph)}
        found.update({f"ops/{name}": graph.session for name, graph in graphs.ops.loaded().items()})
        return found


def load(artefact: Path, source: ModelSource, device: str, precision: str, threads: int) -> S2SRunner:
    return S2SRunner(artefact, device, threads, source.length_rule)
