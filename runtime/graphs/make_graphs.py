"""Writes the tiny helper graphs the runtime runs where the decoder's tensors live (runtime/tensor_ops.py).

Run once by developers (needs the `onnx` package, which the runtime itself never imports):
    python runtime/graphs/make_graphs.py
The graphs are committed; none declares a shape, so each serves every model.
- `select_rows_<dtype>_axis<k>.onnx`: `Gather(values, rows, axis=k)`; rows [n] int64. Beam reorders and
  dropped rows of the decoder state.
- `log_softmax_<dtype>.onnx`: logits [..., vocab] -> log_probs [..., vocab] float32. Beam search with
  logits rules (the rules need every log-prob).
- `beam_candidates_<dtype>.onnx`: a beam step's ranking (runtime/search/beam.py, part 1) where the logits
  live: each row's k best log-probs, the ids `banned` ([m >= 1] int64, shared by every row; -1 bans
  nothing, as onnxruntime cannot broadcast the empty comparison) at -inf, plus the
  row's running score (`scores` [n, num_beams] float32); then each input's `keep` best of its
  num_beams * k (`groups` = [n, -1]) -> `candidate_scores` [n, keep] float32, `candidate_beams` and
  `candidate_ids` [n, keep] int64, best first, equal scores lowest position (beam, then rank) first;
  `candidate_stops` [n, keep] bool where the id is one of `eos` ([e >= 1] int64, -1 for none) and
  `stopping` [1] int64, how many stop. `row_of_beam` ([rows] int64): the logits row of each beam, beams
  in the order they rank in (a decoder may keep its rows in another order, runtime/decoder.py); each row's
  k best are taken in that order before anything ranks them.
  The same float32 operations in the same order as the numpy path (`search.log_probs.rank_candidates`).
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


def _constant(name: str, values: list[int] | float) -> onnx.NodeProto:
    if isinstance(values, float):
        tensor = helper.make_tensor(name, TensorProto.FLOAT, [], [values])
    else:
        tensor = helper.make_tensor(name, TensorProto.INT64, [len(values)], values)
    return helper.make_node("Constant", [], [name], value=tensor)


def beam_candidates(dtype: str) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info("logits", DTYPES[dtype], None),  # [rows, 1, vocab]
              helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
              helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n", "beams"]),
              helper.make_tensor_value_info("banned", TensorProto.INT64, ["m"]),
              helper.make_tensor_value_info("groups", TensorProto.INT64, [2]),
              helper.make_tensor_value_info("keep", TensorProto.INT64, [1]),
              helper.make_tensor_value_info("eos", TensorProto.INT64, ["e"]),
              helper.make_tensor_value_info("row_of_beam", TensorProto.INT64, ["rows"])]
    outputs = [helper.make_tensor_value_info("candidate_scores", TensorProto.FLOAT, ["n", "keep"]),
               helper.make_tensor_value_info("candidate_beams", TensorProto.INT64, ["n", "keep"]),
               helper.make_tensor_value_info("candidate_ids", TensorProto.INT64, ["n", "keep"]),
               helper.make_tensor_value_info("candidate_stops", TensorProto.BOOL, ["n", "keep"]),
               helper.make_tensor_value_info("stopping", TensorProto.INT64, [1])]
    node = helper.make_node
    nodes = _log_softmax_nodes(dtype) + [
        node("TopK", ["log_probs", "k"], ["row_values", "row_indices"], axis=-1, largest=1, sorted=1),  # [rows, 1, k]
        node("Gather", ["row_values", "row_of_beam"], ["values"], axis=0),  # in beam order
        node("Gather", ["row_indices", "row_of_beam"], ["indices"], axis=0),
        # banned ids: a column of them against every candidate id
        _constant("last_axis", [-1]),
        node("Unsqueeze", ["indices", "last_axis"], ["indices_column"]),  # [rows, 1, k, 1]
        node("Equal", ["indices_column", "banned"], ["hits"]),  # [rows, 1, k, m]
        node("Cast", ["hits"], ["hits_float"], to=TensorProto.FLOAT),
        node("ReduceSum", ["hits_float", "last_axis"], ["hit_count"], keepdims=0),  # [rows, 1, k]
        _constant("zero", 0.0),
        node("Greater", ["hit_count", "zero"], ["is_banned"]),
        _constant("minus_inf", float("-inf")),
        node("Where", ["is_banned", "minus_inf", "values"], ["allowed"]),
        _constant("row_column", [-1, 1, 1]),
        node("Reshape", ["scores", "row_column"], ["row_scores"]),  # [rows, 1, 1]
        node("Add", ["allowed", "row_scores"], ["totals"]),  # each continuation's total score
        node("Reshape", ["totals", "groups"], ["input_totals"]),  # [n, num_beams * k]
        node("TopK", ["input_totals", "keep"], ["candidate_scores", "best"], axis=-1, largest=1, sorted=1),
        node("Shape", ["values"], ["values_shape"]),
        _constant("k_axis", [2]),
        node("Gather", ["values_shape", "k_axis"], ["width"], axis=0),  # [1]: k as the graph ran it
        node("Div", ["best", "width"], ["candidate_beams"]),
        node("Reshape", ["indices", "groups"], ["input_ids"]),
        node("GatherElements", ["input_ids", "best"], ["candidate_ids"], axis=1),
        node("Unsqueeze", ["candidate_ids", "last_axis"], ["candidate_column"]),  # [n, keep, 1]
        node("Equal", ["candidate_column", "eos"], ["eos_hits"]),  # [n, keep, e]
        node("Cast", ["eos_hits"], ["eos_hits_float"], to=TensorProto.FLOAT),
        node("ReduceSum", ["eos_hits_float", "last_axis"], ["eos_count"], keepdims=0),
        node("Greater", ["eos_count", "zero"], ["candidate_stops"]),
        node("Cast", ["candidate_stops"], ["stops_int"], to=TensorProto.INT64),
        node("ReduceSum", ["stops_int"], ["stop_count"], keepdims=0),
        _constant("first_axis", [0]),
        node("Unsqueeze", ["stop_count", "first_axis"], ["stopping"])]
    return _model(nodes, "beam_candidates", inputs, outputs)


def main() -> None:
    here = Path(__file__).parent
    for dtype in DTYPES:
        for axis in AXES:
            onnx.save(select_rows(dtype, axis), here / f"select_rows_{dtype}_axis{axis}.onnx")
    for dtype in LOGITS_DTYPES:
        onnx.save(log_softmax(dtype), here / f"log_softmax_{dtype}.onnx")
        onnx.save(beam_candidates(dtype), here / f"beam_candidates_{dtype}.onnx")


if __name__ == "__main__":
    main()
