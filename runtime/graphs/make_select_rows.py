"""Writes the tiny `select_rows_<dtype>_axis<k>.onnx` graphs the runtime uses to gather state rows on the device.

Run once by developers (needs the `onnx` package, which the runtime itself never imports):
    python runtime/graphs/make_select_rows.py
A graph: `Gather(values, rows, axis=k)`, values of any rank (no shape declared), rows [n] int64.
"""

from __future__ import annotations

from pathlib import Path

import onnx
from onnx import TensorProto, helper

DTYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "int64": TensorProto.INT64}
AXES = (0, 1)  # K/V caches gather along 0; nn.LSTM (h, c) along 1


def build(dtype: str, axis: int) -> onnx.ModelProto:
    values = helper.make_tensor_value_info("values", DTYPES[dtype], None)
    rows = helper.make_tensor_value_info("rows", TensorProto.INT64, ["n"])
    selected = helper.make_tensor_value_info("selected", DTYPES[dtype], None)
    node = helper.make_node("Gather", ["values", "rows"], ["selected"], axis=axis)
    graph = helper.make_graph([node], f"select_rows_axis{axis}", [values, rows], [selected])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="s2s")
    model.ir_version = 8
    return model


def main() -> None:
    here = Path(__file__).parent
    for dtype in DTYPES:
        for axis in AXES:
            onnx.save(build(dtype, axis), here / f"select_rows_{dtype}_axis{axis}.onnx")


if __name__ == "__main__":
    main()
