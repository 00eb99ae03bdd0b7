"""--quantize's pieces on their own: the CPU level read from /proc/cpuinfo, the untied output projection
(checked against numpy on a hand-made graph), the manifest's `quantization` record (old manifests without
it still read), and the CLI's refusals. Whole exports are in tests/test_export_passes.py."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from exporter.cli import main as export_main
from exporter.passes.quantize import Scheme, cpu_flags, cpu_level, default_scheme, quantize_graphs
from runtime.manifest import MANIFEST_NAME, Manifest
from tests.cli_asserts import assert_one_line_error

# Real flag sets (abridged to what matters): a Zen 4 EPYC, a Sapphire Rapids Xeon, an Alder Lake
# desktop (AVX2 + AVX-VNNI), a Skylake-SP Xeon (AVX-512 without VNNI), an older EPYC (AVX2 only).
ZEN4 = "fpu sse4_2 avx avx2 fma avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16"
SAPPHIRE_RAPIDS = "sse4_2 avx avx2 avx512f avx512bw avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8"
ALDER_LAKE = "sse4_2 avx avx2 fma avx_vnni"
SKYLAKE_SP = "sse4_2 avx avx2 fma avx512f avx512dq avx512bw avx512vl"
ZEN2 = "sse4_2 avx avx2 fma"


@pytest.mark.parametrize("flags, level", [(ZEN4, "avx512-vnni"), (SAPPHIRE_RAPIDS, "amx"), (ALDER_LAKE, "avx-vnni"),
                                          (SKYLAKE_SP, "avx512"), (ZEN2, "avx2"), ("neon asimd", "other")])
def test_cpu_level_from_cpuinfo(flags, level, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: some cpu\nflags\t\t: {flags}\n\nprocessor\t: 1\n"
                       f"flags\t\t: {flags}\n", encoding="utf-8")
    assert cpu_flags(cpuinfo) == frozenset(flags.split())
    assert cpu_level(cpu_flags(cpuinfo)) == level


def test_cpu_level_without_cpuinfo(tmp_path):
    assert cpu_flags(tmp_path / "missing") == frozenset()
    assert cpu_level(frozenset()) == "other"


def _tied_graph(path, weight):
    """ids [rows] int64 -> Gather(weight) -> hidden [rows, d]; hidden @ Transpose(weight) -> logits [rows, vocab]:
    the tied embedding / output projection as optimum exports it."""
    nodes = [helper.make_node("Gather", ["weight", "ids"], ["hidden"]),
             helper.make_node("Transpose", ["weight"], ["weight_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["hidden", "weight_t"], ["logits"])]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["rows"])],
                              [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["rows", weight.shape[1]]),
                               helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", weight.shape[0]])],
                              [numpy_helper.from_array(weight, "weight")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


@pytest.mark.parametrize("scheme", [default_scheme("int8", "avx512-vnni"), default_scheme("int4", "avx512-vnni")],
                         ids=["int8", "int4"])
def test_tied_output_projection_and_the_embedding_rows_are_quantized(scheme, tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((300, 32)).astype(np.float32)  # [vocab, d_model]
    weight[7] *= 50  # one row far larger than the others: per-row scales keep the rest precise
    path = tmp_path / "tied.onnx"
    _tied_graph(path, weight)
    quantize_graphs([path], scheme)

    model = onnx.load(path)
    ops = [node.op_type for node in model.graph.node]
    assert "Transpose" not in ops and "MatMul" not in ops  # the projection reads a quantized copy now
    tables = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert "weight" not in tables and tables["weight.int8"].dtype == np.int8  # no fp32 copy of the table is left
    ids = np.array([3, 7, 17, 299], dtype=np.int64)
    hidden, logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})
    step = np.abs(weight[ids]).max(axis=1, keepdims=True) / 127
    assert np.abs(hidden - weight[ids]).max() > 0 and np.all(np.abs(hidden - weight[ids]) <= step / 2 * 1.0001)
    expected = weight[ids] @ weight.T
    error = np.abs(logits - expected).max() / np.abs(expected).max()
    assert 0 < error < (0.02 if scheme.bits == 8 else 0.15), error  # quantized, and close


def test_small_tables_and_tables_read_otherwise_stay_float(tmp_path):
    rng = np.random.default_rng(1)
    small = tmp_path / "small.onnx"  # fewer rows than MIN_TABLE_ROWS (T5's relative position buckets)
    _tied_graph(small, rng.standard_normal((64, 8)).astype(np.float32))
    quantize_graphs([small], default_scheme("int8", "avx512-vnni"))
    assert onnx.load(small).graph.initializer[0].data_type == TensorProto.FLOAT
    assert "weight" in {i.name for i in onnx.load(small).graph.initializer}
    shared = tmp_path / "shared.onnx"  # without the untied projection, a Transpose reads the table too
    _tied_graph(shared, rng.standard_normal((300, 8)).astype(np.float32))
    quantize_graphs([shared], Scheme(method="dynamic", bits=8, vocab_projection=False, embeddings=True))
    tables = {i.name: i for i in onnx.load(shared).graph.initializer}
    assert tables["weight"].data_type == TensorProto.FLOAT and "weight.int8" not in tables


def test_without_vocab_projection_the_tied_matmul_stays_float(tmp_path):
    path = tmp_path / "tied.onnx"
    _tied_graph(path, np.ones((8, 4), dtype=np.float32))
    quantize_graphs([path], Scheme(method="dynamic", bits=8, vocab_projection=False))
    assert "MatMul" in [node.op_type for node in onnx.load(path).graph.node]


def test_scheme_record_keeps_the_fields_of_its_method():
    assert set(default_scheme("int8", "avx2").record()) == {
        "method", "bits", "weight_type", "per_channel", "reduce_range", "attention", "vocab_projection", "embeddings",
        "cpu"}
    assert set(default_scheme("int4", "avx2").record()) == {
        "method", "bits", "block_size", "accuracy_level", "vocab_projection", "embeddings", "cpu"}


def test_manifest_records_quantization_and_reads_old_manifests(exported_dir, tmp_path):
    manifest = Manifest.read(exported_dir("t5"))
    raw = manifest.to_dict()
    assert raw["quantization"] == {}
    del raw["quantization"]  # a manifest written before the field existed
    assert Manifest.from_dict(raw).quantization == {}
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(dict(raw, quantization=default_scheme("int8", "amx").record())),
                                          encoding="utf-8")
    assert Manifest.read(tmp_path).quantization["cpu"] == "amx"


@pytest.mark.parametrize("args, fragment", [
    (["--quantize", "int4", "--dtype", "fp16"], "use one or the other"),
    (["--quantize", "int2"], "'int2' is not one of 'int8', 'int4'"),
])
def test_cli_refuses_bad_quantize_options(args, fragment, hf_model_dir, tmp_path):
    result = CliRunner().invoke(export_main, [str(hf_model_dir("t5")), "-o", str(tmp_path / "out"), *args])
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "out").exists()
