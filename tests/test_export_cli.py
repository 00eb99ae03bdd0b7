"""s2s-export on the command line: a successful run shows each step with its time, and every bad input
is one clear line with a non-zero exit, no traceback, and nothing left behind."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner

from exporter.cli import main
from runtime.manifest import MANIFEST_NAME
from tests.cli_asserts import assert_one_line_error


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _assert_nothing_left(parent, name="out"):
    """No output directory, and no staging directory (".out.s2s-export-*") beside it."""
    leftovers = [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]
    assert leftovers == []


@pytest.mark.slow
def test_export_shows_steps_and_replaces_with_force(hf_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("an earlier export", encoding="utf-8")
    result = _run(hf_model_dir("bart"), "-o", out, "--force")
    assert result.exit_code == 0, result.output
    steps = result.stderr.splitlines()
    for step in ("load model", "export encoder", "export decoder (cached steps)", "validate", "move into place"):
        assert any(line.startswith(f"{step} ... ") and line.endswith(" s") for line in steps), steps
    assert "Exported bart" in result.stdout
    assert "greedy tokens vs PyTorch" in result.stdout and "identical" in result.stdout
    assert (out / MANIFEST_NAME).is_file() and not (out / "old.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old directory is gone, no staging left


def test_help_explains_every_option():
    result = _run("--help")
    assert result.exit_code == 0
    for option in ("--output", "--dtype", "--quantize", "--optimize", "--no-validate", "--atol", "--force", "--opset"):
        assert option in result.output
    assert "Examples:" in result.output


def test_missing_path(tmp_path):
    assert_one_line_error(_run(tmp_path / "no-such-model", "-o", tmp_path / "out"), "does not exist")
    _assert_nothing_left(tmp_path)


def test_directory_without_config(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "notes.txt").write_text("not a model", encoding="utf-8")
    assert_one_line_error(_run(model, "-o", tmp_path / "out"), "holds no model", "config.json")
    _assert_nothing_left(tmp_path)


def test_unreadable_config(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{ not json", encoding="utf-8")
    assert_one_line_error(_run(model, "-o", tmp_path / "out"), "cannot read", "config.json")
    _assert_nothing_left(tmp_path)


def _edited_copy(model_dir, copy_dir, **config_changes):
    """A copy of a checkpoint whose config.json has `config_changes` applied."""
    shutil.copytree(model_dir, copy_dir)
    config = json.loads((copy_dir / "config.json").read_text(encoding="utf-8"))
    (copy_dir / "config.json").write_text(json.dumps({**config, **config_changes}), encoding="utf-8")
    return copy_dir


def test_config_value_of_the_wrong_type(hf_model_dir, tmp_path):
    model = _edited_copy(hf_model_dir("bart"), tmp_path / "model", d_model="x")
    assert_one_line_error(_run(model, "-o", tmp_path / "out"), "config.json describes a model transformers",
                          "cannot build", "d_model is 'x', expected an integer", "correct config.json")
    _assert_nothing_left(tmp_path)


def test_config_that_does_not_fit_the_weights(hf_model_dir, hf_torch_model, tmp_path):
    vocab_size = hf_torch_model("bart").config.vocab_size
    model = _edited_copy(hf_model_dir("bart"), tmp_path / "model", vocab_size=vocab_size + 7)
    # torch's own words for the first tensor that does not fit, with both shapes.
    assert_one_line_error(_run(model, "-o", tmp_path / "out"), "do not fit its config.json", "size mismatch for ",
                          f"{vocab_size}])", f"{vocab_size + 7}])", "vocab_size")
    _assert_nothing_left(tmp_path)


def _supported_listed(message):
    return all(model_type in message for model_type in ("t5", "bart", "marian", "pegasus", "mbart", "m2m_100"))


def test_encoder_only_model(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37).save_pretrained(
        tmp_path / "bert")
    result = _run(tmp_path / "bert", "-o", tmp_path / "out")
    assert_one_line_error(result, "'bert' is an encoder-only model", "supported model types")
    assert _supported_listed(result.output)
    _assert_nothing_left(tmp_path)


def test_decoder_only_model(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")
    result = _run(tmp_path / "gpt2", "-o", tmp_path / "out")
    assert_one_line_error(result, "'gpt2' is a decoder-only model", "supported model types")
    assert _supported_listed(result.output)
    _assert_nothing_left(tmp_path)


def test_truncated_weights(hf_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(hf_model_dir("t5"), model)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert_one_line_error(_run(model, "-o", tmp_path / "out"), "cannot load the weights", "truncated or corrupt")
    _assert_nothing_left(tmp_path)


@pytest.mark.slow
def test_incomplete_fp16_shape_inference_writes_nothing_outside_the_export(hf_model_dir, tmp_path, monkeypatch):
    """onnxruntime's symbolic shape inference stopping at a tensor it cannot type is one line, and the
    partial graph it then saves into the working directory (sym_shape_infer_temp.onnx and its weights)
    stays inside the staging directory, which is removed."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    infer = SymbolicShapeInference._infer_impl

    def incomplete(self):  # what the inference returns when it stops at an operator it does not know
        infer(self)
        return False

    monkeypatch.setattr(SymbolicShapeInference, "_infer_impl", incomplete)
    working_dir = tmp_path / "cwd"
    working_dir.mkdir()
    monkeypatch.chdir(working_dir)
    result = _run(hf_model_dir("t5"), "-o", tmp_path / "out", "--dtype", "fp16")
    assert_one_line_error(result, "--dtype fp16: onnxruntime's shape inference cannot find the element type",
                          "Incomplete symbolic shape inference", "export without --dtype fp16")
    assert list(working_dir.iterdir()) == []
    _assert_nothing_left(tmp_path)


@pytest.mark.slow
def test_export_gets_the_umask_permissions_without_changing_it(hf_model_dir, tmp_path, monkeypatch):
    """The output is an ordinary directory (not a temporary directory's private 0700): it and its files
    get what the umask leaves of 0777 and 0666. The umask itself, shared by every thread, is never changed."""
    previous = os.umask(0o027)
    try:
        def changed(mask):
            raise AssertionError(f"the exporter set the process umask to {mask:o}")

        monkeypatch.setattr(os, "umask", changed)
        result = _run(hf_model_dir("t5"), "-o", tmp_path / "out", "--no-validate")
        monkeypatch.undo()
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "out" / "encoder.onnx").stat().st_mode & 0o777 == 0o640


def test_output_exists_and_is_not_empty(hf_model_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")
    assert_one_line_error(_run(hf_model_dir("t5"), "-o", out), "exists and is not empty", "--force")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_never_replaces_the_model_itself(hf_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(hf_model_dir("t5"), model)
    assert_one_line_error(_run(model, "-o", model, "--force"), "holds the model being exported")
    assert (model / "config.json").is_file()


def test_output_is_a_file(hf_model_dir, tmp_path):
    target = tmp_path / "out"
    target.write_text("a file", encoding="utf-8")
    assert_one_line_error(_run(hf_model_dir("t5"), "-o", target), "is a file")


def test_output_under_a_file_cannot_be_written(hf_model_dir, tmp_path):
    (tmp_path / "file.txt").write_text("a file", encoding="utf-8")
    assert_one_line_error(_run(hf_model_dir("t5"), "-o", tmp_path / "file.txt" / "out"), "is a file, not a directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory(hf_model_dir, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert_one_line_error(_run(hf_model_dir("t5"), "-o", locked / "out"), "cannot write to")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


def test_hub_id_while_offline(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # "someone/some-model" must not exist as a local path
    result = _run("someone/some-model", "-o", tmp_path / "out")
    assert_one_line_error(result, "is not a local directory and the model hub is not reachable (offline)",
                           "save_pretrained")
    _assert_nothing_left(tmp_path)


@pytest.mark.parametrize("args, fragment", [
    (["--dtype", "fp16", "--quantize", "int8"], "use one or the other"),
    (["--atol", "0"], "atol=0.0: must be > 0"),
    (["--opset", "9"], "opset=9: must be between"),
])
def test_contradictory_or_out_of_range_options(args, fragment, hf_model_dir, tmp_path):
    assert_one_line_error(_run(hf_model_dir("t5"), "-o", tmp_path / "out", *args), fragment)
    _assert_nothing_left(tmp_path)


@pytest.mark.slow
def test_failed_validation_leaves_nothing(hf_model_dir, tmp_path):
    result = _run(hf_model_dir("t5"), "-o", tmp_path / "out", "--quantize", "int8", "--atol", "1e-6")
    assert_one_line_error(result, "differ from PyTorch by up to", "above the allowed 1e-06", "--atol", "--no-validate")
    _assert_nothing_left(tmp_path)
