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
def test_tied_output_projection_is_quantized_and_the_embedding_is_not(scheme, tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 32)).astype(np.float32)  # [vocab, d_model]
    path = tmp_path / "tied.onnx"
    _tied_graph(path, weight)
    quantize_graphs([path], scheme)

    model = onnx.load(path)
    ops = [node.op_type for node in model.graph.node]
    assert "Transpose" not in ops and "MatMul" not in ops  # the projection reads a quantized copy now
    assert numpy_helper.to_array({i.name: i for i in model.graph.initializer}["weight"]).dtype == np.float32
    ids = np.array([3, 17, 40], dtype=np.int64)
    hidden, logits = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})
    np.testing.assert_array_equal(hidden, weight[ids])  # the embedding is exact
    expected = weight[ids] @ weight.T
    error = np.abs(logits - expected).max() / np.abs(expected).max()
    assert 0 < error < (0.02 if scheme.bits == 8 else 0.15), error  # quantized, and close


def test_without_vocab_projection_the_tied_matmul_stays_float(tmp_path):
    path = tmp_path / "tied.onnx"
    _tied_graph(path, np.ones((8, 4), dtype=np.float32))
    quantize_graphs([path], Scheme(method="dynamic", bits=8, vocab_projection=False))
    assert "MatMul" in [node.op_type for node in onnx.load(path).graph.node]


def test_scheme_record_keeps_the_fields_of_its_method():
    assert set(default_scheme("int8", "avx2").record()) == {
        "method", "bits", "weight_type", "per_channel", "reduce_range", "attention", "vocab_projection", "cpu"}
    assert set(default_scheme("int4", "avx2").record()) == {
        "method", "bits", "block_size", "accuracy_level", "vocab_projection", "cpu"}


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
