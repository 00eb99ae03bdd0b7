"""The contract's graph names (runtime/manifest.py): a graph that takes an input the runtime does not
feed is refused when the directory is loaded, in one line naming the graph and the input, rather
than by onnxruntime in the middle of a generate call.

The graphs here are tiny hand-built ones (no export): only their declared inputs and outputs matter,
and the same pair without the extra input is the control that loads."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import runtime
from runtime.cli import main as run_main
from runtime.errors import ExportDirError
from runtime.manifest import (
    ENCODER_ATTENTION_MASK,
    ENCODER_HIDDEN_STATES,
    INPUT_IDS,
    LAST_HIDDEN_STATE,
    LOGITS,
    Manifest,
    StateTensor,
)
from tests.cli_asserts import assert_one_line_error

VOCAB = 8


def _save(path: Path, inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
          nodes: list[onnx.NodeProto]) -> None:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs)
    # IR version 8 (opset 17): what onnxruntime 1.18, the oldest this project supports, reads
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)


def _export_dir(directory: Path, extra_decoder_input: str | None) -> Path:
    """encoder: input_ids [batch, src_len] -> last_hidden_state [batch, src_len, 1];
    decoder: input_ids [rows, 1], encoder_hidden_states (+ the extra input) -> logits [rows, 1, VOCAB]."""
    directory.mkdir()
    _save(directory / "encoder.onnx",
          [helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["batch", "src_len"])],
          [helper.make_tensor_value_info(LAST_HIDDEN_STATE, TensorProto.FLOAT, ["batch", "src_len", 1])],
          [helper.make_node("Constant", [], ["axes"], value_ints=[2]),
           helper.make_node("Unsqueeze", [INPUT_IDS, "axes"], ["ids3"]),
           helper.make_node("Cast", ["ids3"], [LAST_HIDDEN_STATE], to=TensorProto.FLOAT)])
    decoder_inputs = [helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, ["rows", 1]),
                      helper.make_tensor_value_info(ENCODER_HIDDEN_STATES, TensorProto.FLOAT, ["rows", "src_len", 1])]
    if extra_decoder_input is not None:
        decoder_inputs.append(helper.make_tensor_value_info(extra_decoder_input, TensorProto.INT64, ["rows"]))
    _save(directory / "decoder.onnx", decoder_inputs,
          [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["rows", 1, VOCAB])],
          [helper.make_node("Constant", [], ["depth"], value_ints=[VOCAB]),
           helper.make_node("Constant", [], ["off_on"], value_floats=[0.0, 1.0]),
           helper.make_node("OneHot", [INPUT_IDS, "depth", "off_on"], [LOGITS])])
    Manifest(encoder_file="encoder.onnx", decoder_file="decoder.onnx", states=(), eos_token_ids=(1,),
             pad_token_id=0, decoder_start_token_id=0, vocab_size=VOCAB).write(directory)
    return directory


def test_a_decoder_input_the_runtime_cannot_feed_is_refused_at_load(tmp_path):
    control = _export_dir(tmp_path / "plain", None)
    assert runtime.load(control, provider="cpu").graphs.vocab_size == VOCAB

    wanting = _export_dir(tmp_path / "cache-position", "cache_position")
    with pytest.raises(ExportDirError) as refused:
        runtime.load(wanting, provider="cpu")
    message = str(refused.value)
    assert "decoder.onnx" in message and "'cache_position'" in message and "\n" not in message
    assert INPUT_IDS in message  # it says what the runtime does feed


def test_s2s_run_prints_the_refusal_as_one_line(tmp_path):
    wanting = _export_dir(tmp_path / "cache-position", "cache_position")
    result = CliRunner().invoke(run_main, [str(wanting), "hello", "--provider", "cpu"])
    assert_one_line_error(result, "decoder.onnx", "cache_position")


def test_a_decoder_is_fed_its_states_and_use_cache_branch():
    past = StateTensor(input_name="past_key_values.0.decoder.key", output_name="present.0.decoder.key",
                       batch_axis=0, seq_axis=2, kind="grows")
    manifest = Manifest(encoder_file="encoder.onnx", decoder_file="decoder.onnx", states=(past,),
                        eos_token_ids=(1,), pad_token_id=0, decoder_start_token_id=0, vocab_size=VOCAB,
                        use_cache_branch="use_cache_branch")
    fed = [INPUT_IDS, ENCODER_ATTENTION_MASK, past.input_name, "use_cache_branch"]
    manifest.check_feedable("decoder_model_merged.onnx", fed, "decoder")
    with pytest.raises(ExportDirError, match=r"encoder.onnx takes input\(s\) \['past_key_values.0.decoder.key'\]"):
        manifest.check_feedable("encoder.onnx", [INPUT_IDS, past.input_name], "encoder")
