"""exporter/passes/packed_qkv.py: one q/k/v projection per self-attention layer.

The oracle is the same model exported without the pass: the packed product computes every column as
before, so tokens and beam scores must be equal bit for bit (float32 and int8), on padded batches. The
default export carries the pass, so tests/test_generate_parity.py holds it against transformers too.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import runtime
from exporter.passes.packed_qkv import PackedQKVNotApplicable, pack_qkv
from runtime.manifest import Manifest
from tests.fixtures.hf_models import SAMPLE_TEXTS, VARIANTS

OPTIONS = [dict(num_beams=1, max_new_tokens=12, min_new_tokens=12), dict(num_beams=4, max_new_tokens=12),
           dict(num_beams=3, num_return_sequences=2, max_new_tokens=10, no_repeat_ngram_size=2)]


def _attention_inputs(export_dir) -> list[list[str]]:
    manifest = Manifest.read(export_dir)
    graph = onnx.load(export_dir / manifest.decoder_file).graph
    return [list(node.input[:3]) for node in graph.node if node.op_type == "GroupQueryAttention"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_layer_reads_one_packed_projection(variant, exported_dir):
    for kwargs in ({}, {"quantize": "int8"}):
        out = exported_dir(variant, **kwargs)
        assert "packed-qkv" in Manifest.read(out).passes, kwargs
        layers = _attention_inputs(out)
        assert layers and all(key == value == "" and query for query, key, value in layers), kwargs
    plain = exported_dir(variant, packed_qkv=False)
    assert "packed-qkv" not in Manifest.read(plain).passes
    assert all(key and value for _, key, value in _attention_inputs(plain))


@pytest.mark.parametrize("variant", ["t5", "bart", "marian"])  # bart, marian: projections with biases
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_same_tokens_and_scores_as_three_projections(variant, quantize, exported_dir, hf_tokenizer):
    kwargs = {"quantize": quantize} if quantize else {}
    packed = runtime.load(exported_dir(variant, **kwargs), provider="cpu")
    plain = runtime.load(exported_dir(variant, packed_qkv=False, **kwargs), provider="cpu")
    batch = hf_tokenizer(variant)(SAMPLE_TEXTS[:3], return_tensors="np", padding=True)
    for options in OPTIONS:
        expected = plain.generate_with_scores(batch["input_ids"], batch["attention_mask"], **options)
        got = packed.generate_with_scores(batch["input_ids"], batch["attention_mask"], **options)
        np.testing.assert_array_equal(got.sequences, expected.sequences, err_msg=str(options))
        if expected.scores is not None:
            np.testing.assert_array_equal(got.scores, expected.scores, err_msg=str(options))


def test_a_projection_read_elsewhere_stays_apart(exported_dir, tmp_path):
    """A layer whose key projection has a second reader keeps its three projections; the others are packed.
    With no layer left to pack the pass refuses and leaves the file as it was."""
    out = tmp_path / "export"
    shutil.copytree(exported_dir("t5", packed_qkv=False), out)
    manifest = Manifest.read(out)
    path = out / manifest.decoder_file
    model = onnx.load(path)
    attention = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    first_key = attention[0].input[1]
    model.graph.node.append(helper.make_node("Identity", [first_key], ["probe.key"]))
    model.graph.output.append(helper.make_tensor_value_info("probe.key", onnx.TensorProto.FLOAT, None))
    onnx.save(model, path)
    pack_qkv(out, manifest)
    layers = _attention_inputs(out)
    assert layers[0][1:] == [first_key, attention[0].input[2]]
    assert all(key == value == "" for _, key, value in layers[1:])

    single = tmp_path / "single"
    shutil.copytree(exported_dir("t5", packed_qkv=False), single)
    path = single / manifest.decoder_file
    model = onnx.load(path)
    for node in model.graph.node:
        if node.op_type == "GroupQueryAttention":
            model.graph.node.append(helper.make_node("Identity", [node.input[2]], [f"probe.{node.name}"]))
            model.graph.output.append(helper.make_tensor_value_info(f"probe.{node.name}", onnx.TensorProto.FLOAT,
                                                                    None))
    onnx.save(model, path)
    before = path.read_bytes()
    with pytest.raises(PackedQKVNotApplicable, match="read by 2 nodes"):
        pack_qkv(single, manifest)
    assert path.read_bytes() == before


def test_a_bias_on_some_projections_only_stays_apart(exported_dir, tmp_path):
    out = tmp_path / "export"
    shutil.copytree(exported_dir("t5", packed_qkv=False), out)
    manifest = Manifest.read(out)
    path = out / manifest.decoder_file
    model = onnx.load(path)
    graph = model.graph
    producer = {name: n for n in graph.node for name in n.output}
    weights = {init.name: init for init in graph.initializer}
    nodes = []
    for index, node in enumerate(graph.node):
        if node.op_type == "GroupQueryAttention":  # q + 0 just before it: a bias on q alone
            width = weights[producer[node.input[0]].input[1]].dims[1]
            graph.initializer.append(numpy_helper.from_array(np.zeros(width, np.float32), f"probe.bias.{index}"))
            nodes.append(helper.make_node("Add", [node.input[0], f"probe.bias.{index}"], [f"probe.biased.{index}"]))
            node.input[0] = f"probe.biased.{index}"
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, path)
    with pytest.raises(PackedQKVNotApplicable, match="bias on some"):
        pack_qkv(out, manifest)
