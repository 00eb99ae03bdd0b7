"""torch.onnx tracing shared by the models/ sources (exporter/sources/custom*.py).

The TorchScript tracer, as optimum uses it: the exported axes are dynamic, and the traced example
inputs have sizes that are none of 0 or 1, which the tracer could bake into the graph. The tests run
other sizes, and empty caches.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import nn

from models.checkpoint import TOKENIZER_NAME, Checkpoint
from runtime.manifest import Manifest, StateTensor

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"
DEFAULT_OPSET = 17  # LayerNormalization is a single op from 17 on
TRACE_ROWS, TRACE_SRC_LEN, TRACE_PAST_LEN = 2, 5, 3
TRACE_NEW_LEN = 3  # positions a decoder-only step takes at once when traced (the prompt is several)
TRACE_TOKEN = 0  # any id of the vocabulary: the trace does not depend on the values


def state_axes(spec: StateTensor, rows: str, seq: str) -> dict[int, str]:
    """Dynamic axes of a state tensor: its batch axis, and its sequence axis if it has one."""
    axes = {spec.batch_axis: rows}
    if spec.seq_axis is not None:
        axes[spec.seq_axis] = seq
    return axes


def trace(module: nn.Module, args: tuple, path: Path, input_names: list[str], output_names: list[str],
          dynamic_axes: dict, opset: int) -> None:
    """Export `module` called on `args` to `path`, in eval mode, without gradients."""
    module.eval()
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), input_names=input_names, output_names=output_names,
                          dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False, do_constant_folding=True)


def finish_with_tokenizer(manifest: Manifest | None, checkpoint: Checkpoint, out_dir: Path) -> Manifest:
    """A models/ source's finish(): copy the checkpoint's tokenizer.json beside the graphs (the layout is
    final as exported) and return the manifest export_graphs() built."""
    if manifest is None:
        raise RuntimeError("finish() before export_graphs()")
    if checkpoint.tokenizer_file is not None:
        shutil.copyfile(checkpoint.tokenizer_file, Path(out_dir) / TOKENIZER_NAME)
    return manifest
