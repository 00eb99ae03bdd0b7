"""Graph passes run after export, on each graph file the source's export manifest names, in this order:
`optimize` (onnxruntime's transformer fusions), then `fp16` or `quantize` (int8); after the source
finishes its layout, `kv_buffer` (self-attention cache written in place), `packed_qkv` (one q/k/v
projection per layer), `greedy_head` (greedy's argmax in the decoder) and last `shared_weights` (a
tensor several graphs hold, stored once). Each rewrites its graphs in place; the manifest records what ran.
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx

# protobuf cannot serialize a message of 2 GiB or more: larger graphs keep their tensors beside them.
_PROTOBUF_LIMIT = 2**31 - 1


def external_data_file(graph: Path) -> Path:
    """Where a graph's tensors live when they do not fit in it (optimum's naming: `<file>_data`)."""
    return graph.with_name(graph.name + "_data")


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    """Replace the graph at `path` with `model`, writing its tensors to `<file>_data` only when it is too
    large for one protobuf file; a stale data file of the old graph is removed."""
    data = external_data_file(path)
    large = model.ByteSize() > _PROTOBUF_LIMIT
    staged = path.with_name(path.name + ".tmp")
    if data.exists():
        data.unlink()  # the model is in memory (loaded with its external data): the old file is not needed
    onnx.save_model(model, staged, save_as_external_data=large, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    os.replace(staged, path)
