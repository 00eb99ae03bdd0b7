"""Writes the tiny helper graphs the runtime runs where the decoder's tensors live (runtime/tensor_ops.py).

Run once by developers (needs the `onnx` package, which the runtime itself never imports):
    python runtime/graphs/make_graphs.py
The graphs are committed; none declares a shape, so each serves every model.
- `select_rows_<dtype>_axis<k>.onnx`: `Gather(values, rows, axis=k)`; rows [n] int64. Beam reorders and
  dropped rows of the decoder state.
- `log_softmax_<dtype>.onnx`: logits [..., vocab] -> log_probs [..., vocab] float32. Beam search with
  logits rules (the rules need every log-prob).
- `top_log_probs_<dtype>.onnx`: logits [..., vocab], k [1] int64 -> values [..., k] float32 and
  indices [..., k] int64, the k largest log-probs, largest first; equal values lowest index first (ONNX
  TopK's tie rule). Beam search without rules: only 2 * num_beams candidates per row leave the graph.
float16 logits are cast to float32 first, as transformers casts them before its log_softmax.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64}
LOGITS_DTYPES = ("float32", "float16")
AXES = (0, 1)  # K/V caches gather along 0; nn.LSTM (h, c) along 1
OPSET = 13


def _model(nodes: list[onnx.NodeProto], name: str, inputs: list[onnx.ValueInfoProto],
           outputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="s2s")
    model.ir_version = 8
    return model


def select_rows(dtype: str, axis: int) -> onnx.ModelProto:
    values = helper.make_tensor_value_info("values", DTYPES[dtype], None)
    rows = helper.make_tensor_value_info("rows", TensorProto.INT64, ["n"])
    selected = helper.make_tensor_value_info("selected", DTYPES[dtype], None)
    node = helper.make_node("Gather", ["values", "rows"], ["selected"], axis=axis)
    return _model([node], f"select_rows_axis{axis}", [values, rows], [selected])


def _log_softmax_nodes(dtype: str) -> list[onnx.NodeProto]:
    """logits -> log_probs (float32), over the last axis."""
    nodes = []
    source = "logits"
    if dtype != "float32":
        nodes.append(helper.make_node("Cast", ["logits"], ["logits_float32"], to=TensorProto.FLOAT))
        source = "logits_float32"
    nodes.append(helper.make_node("LogSoftmax", [source], ["log_probs"], axis=-1))
    return nodes


def log_softmax(dtype: str) -> onnx.ModelProto:
    logits = helper.make_tensor_value_info("logits", DTYPES[dtype], None)
    log_probs = helper.make_tensor_value_info("log_probs", TensorProto.FLOAT, None)
    return _model(_log_softmax_nodes(dtype), "log_softmax", [logits], [log_probs])


def top_log_probs(dtype: str) -> onnx.ModelProto:
    logits = helper.make_tensor_value_info("logits", DTYPES[dtype], None)
    k = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    values = helper.make_tensor_value_info("values", TensorProto.FLOAT, None)
    indices = helper.make_tensor_value_info("indices", TensorProto.INT64, None)
    nodes = _log_softmax_nodes(dtype) + [
        helper.make_node("TopK", ["log_probs", "k"], ["values", "indices"], axis=-1, largest=1, sorted=1)]
    return _model(nodes, "top_log_probs", [logits, k], [values, indices])


def main() -> None:
    here = Path(__file__).parent
    for dtype in DTYPES:
        for axis in AXES:
            onnx.save(select_rows(dtype, axis), here / f"select_rows_{dtype}_axis{axis}.onnx")
    for dtype in LOGITS_DTYPES:
        onnx.save(log_softmax(dtype), here / f"log_softmax_{dtype}.onnx")
        onnx.save(top_log_probs(dtype), here / f"top_log_probs_{dtype}.onnx")


if __name__ == "__main__":
    main()
