"""Weights two graphs hold identically, kept once: in `shared_weights.bin`, mapped by every session.

An encoder-decoder export is two or three graphs, and they repeat tensors: the encoder and the decoder
of every tied-embedding model (T5, BART, Marian, Pegasus) each hold the embedding table, and optimum's
split layout repeats every decoder weight in its first-step graph. Held inside each graph file, every
session copies its tensors into its own memory: a loaded t5-small held its 63 MiB table twice, all of it
resident (mBART's 250k x 1024 table: 1 GiB twice).

This pass finds initializers of at least `MIN_BYTES` that are byte-identical (same type, shape and
data) in two or more of the export's graphs, writes each once to `shared_weights.bin` at offsets aligned
to 4 KiB, and makes every graph that held it read it from there as standard ONNX external data: each
graph stays loadable on its own by any onnxruntime. onnxruntime maps page-aligned external data into
memory rather than copying it (on the CPU), so the sessions share the file's pages, and only the rows a
Gather touches become resident; processes serving the same directory share them too. Measured on
t5-small fp32, greedy batch 1 (`python -m bench.ort_probes rss BEFORE AFTER --rounds 3`): peak RSS
480-488 -> 391-403 MiB; the export directory 301 -> 237 MB. The manifest's `shared_weights` lists, per
tensor, where it lies and its name in each graph (the runtime checks the file is whole before loading).

Nothing here knows an architecture: what is shared is whatever is equal. Run last, after the passes that
rewrite weights (quantize, fp16), so that what it compares is what the graphs run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from exporter.passes import save_graph
from runtime.manifest import SHARED_WEIGHT_DTYPES, SHARED_WEIGHTS_FILE, SharedWeight

MIN_BYTES = 4096  # below a page a second copy costs no more than the bookkeeping (and tiny test models share too)
_ALIGN = 4096


def share_weights(export_dir: Path, graph_files: Sequence[str]) -> tuple[SharedWeight, ...]:
    """Rewrite the graphs in `export_dir` named by `graph_files` in place (see the module docstring).

    Returns the manifest's `shared_weights` entries; () (nothing written, graphs untouched) when no
    large tensor repeats across the graphs.
    """
    models = {name: onnx.load(export_dir / name, load_external_data=True) for name in graph_files}
    groups: dict[tuple, dict[str, onnx.TensorProto]] = {}
    for name, model in models.items():
        for tensor in model.graph.initializer:
            key = _key(tensor)
            if key is not None:
                groups.setdefault(key, {}).setdefault(name, tensor)  # a graph's first copy of it
    shared = [by_graph for by_graph in groups.values() if len(by_graph) > 1]
    if not shared:
        return ()
    entries = []
    with open(export_dir / SHARED_WEIGHTS_FILE, "wb") as out:
        for by_graph in shared:
            first = next(iter(by_graph.values()))
            data = _raw_bytes(first)
            offset = -(-out.tell() // _ALIGN) * _ALIGN
            out.write(b"\0" * (offset - out.tell()))
            out.write(data)
            entries.append(SharedWeight(
                file=SHARED_WEIGHTS_FILE, offset=offset, dtype=np.dtype(helper.tensor_dtype_to_np_dtype(
                    first.data_type)).name, shape=tuple(int(d) for d in first.dims),
                names={graph: tensor.name for graph, tensor in by_graph.items()}))
            for tensor in by_graph.values():
                _point_at(tensor, offset, len(data))
    for name, model in models.items():
        save_graph(model, export_dir / name)
    return tuple(entries)


def _key(tensor: onnx.TensorProto) -> tuple | None:
    """What makes two initializers interchangeable: type, shape and bytes (hashed); None if too small, or
    of a type the manifest does not list (SHARED_WEIGHT_DTYPES: it would refuse its own export)."""
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        return None
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    if dtype.name not in SHARED_WEIGHT_DTYPES:
        return None
    itemsize = dtype.itemsize
    if int(np.prod(tensor.dims, dtype=np.int64)) * itemsize < MIN_BYTES:
        return None
    digest = hashlib.blake2b(_raw_bytes(tensor), digest_size=16).digest()
    return tensor.data_type, tuple(tensor.dims), digest


def _raw_bytes(tensor: onnx.TensorProto) -> bytes:
    """The tensor's data as ONNX external data stores it (little-endian, row-major)."""
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return onnx.numpy_helper.to_array(tensor).tobytes()  # typed fields (float_data, ...): convert


def _point_at(tensor: onnx.TensorProto, offset: int, length: int) -> None:
    """Make `tensor` read its data from SHARED_WEIGHTS_FILE at `offset`, beside the graph file."""
    name, dims, data_type = tensor.name, list(tensor.dims), tensor.data_type
    tensor.Clear()
    tensor.name, tensor.data_type = name, data_type
    tensor.dims.extend(dims)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", SHARED_WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
