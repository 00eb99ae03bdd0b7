"""Bad models/ checkpoints fail with an S2SError that names the problem and the fix."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from exporter.sources import load_source
from models.checkpoint import CONFIG_NAME, CheckpointError, ModelConfig, save_checkpoint
from runtime.errors import S2SError, UnsupportedModelError
from tests.custom_models import ARGS, TOKENS, random_model, torch_threads

CLASS = "EfficientInstructionLLM"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: more threads only contend (the machine is shared)."""
    with torch_threads(1):
        yield


@pytest.fixture()
def checkpoint(tmp_path):
    """A valid checkpoint directory to break."""
    save_checkpoint(random_model(CLASS), ModelConfig(CLASS, ARGS[CLASS], TOKENS), tmp_path)
    return tmp_path


def _edit_config(path, **changes):
    config = json.loads((path / CONFIG_NAME).read_text())
    config.update(changes)
    (path / CONFIG_NAME).write_text(json.dumps(config))


def _edit_weights(path, edit):
    from safetensors.torch import load_file, save_file

    weights = load_file(str(path / "model.safetensors"))
    edit(weights)
    save_file(weights, str(path / "model.safetensors"))


def test_valid_checkpoint_loads(checkpoint):
    assert load_source(checkpoint).model_type == CLASS


def test_unknown_class(checkpoint):
    _edit_config(checkpoint, **{"class": "TransformerXL"})
    with pytest.raises(UnsupportedModelError, match=r"'TransformerXL' is not a models/ architecture.*EncoderDecoder"):
        load_source(checkpoint)


def test_missing_keys(checkpoint):
    _edit_weights(checkpoint, lambda w: w.pop("fc_out.bias"))
    with pytest.raises(CheckpointError, match=r"missing \[fc_out\.bias\], unexpected none.*fix \"class\"/\"args\""):
        load_source(checkpoint)


def test_unexpected_keys(checkpoint):
    _edit_weights(checkpoint, lambda w: w.update({"pos_embedding.weight": torch.zeros(4, 16)}))
    with pytest.raises(CheckpointError, match=r"missing none, unexpected \[pos_embedding\.weight\]"):
        load_source(checkpoint)


def test_more_layers_than_config(checkpoint):
    _edit_config(checkpoint, args=dict(ARGS[CLASS], num_layers=1))
    with pytest.raises(CheckpointError, match=r"unexpected \[transformer\.decoder\.layers\.1\..*and \d+ more"):
        load_source(checkpoint)


def test_wrong_shapes(checkpoint):
    _edit_config(checkpoint, args=dict(ARGS[CLASS], vocab_size=60))
    with pytest.raises(CheckpointError, match=r"embedding\.weight \[48, 16\] \(model: \[60, 16\]\).*set \"args\""):
        load_source(checkpoint)


@pytest.mark.parametrize("args, message", [
    (dict(ARGS[CLASS], d_model="16"), r"args\.d_model must be int, found str '16'"),
    (dict(ARGS[CLASS], num_layers=2.0), r"args\.num_layers must be int, found float 2\.0"),
    (dict(ARGS[CLASS], nhead=True), r"args\.nhead must be int, found bool True"),
    (dict(ARGS[CLASS], nhead=0), r"args\.nhead must be >= 1, found 0"),
    (dict(ARGS[CLASS], dropout="none"), r"args\.dropout must be float, found str"),
    (dict(ARGS[CLASS], positional_encoding="learned"), r"positional_encoding='learned': expected one of"),
    (dict(ARGS[CLASS], nhead=3), r"d_model=16 must be divisible by nhead=3"),
    (dict(ARGS[CLASS], hidden_size=16), r"takes no argument\(s\) \['hidden_size'\]"),
    ({k: v for k, v in ARGS[CLASS].items() if k != "nhead"}, r"args lacks \['nhead'\]"),
])
def test_config_with_wrong_types_or_values(checkpoint, args, message):
    _edit_config(checkpoint, args=args)
    with pytest.raises(CheckpointError, match=message):
        load_source(checkpoint)


@pytest.mark.parametrize("changes, message", [
    (dict(special_tokens={"pad_token_id": 0, "eos_token_id": 2}), r"missing \['decoder_start_token_id'\]"),
    (dict(special_tokens=dict(TOKENS, eos_token_id=99)),
     r"special_tokens\.eos_token_id must be an int in \[0, vocab_size=48\)"),
    (dict(args=[16, 2]), r"'args' must be a JSON object, found list"),
    (dict(tokenizer="tok.json"), r"unknown field\(s\) \['tokenizer'\]"),
])
def test_config_structure(checkpoint, changes, message):
    _edit_config(checkpoint, **changes)
    with pytest.raises(CheckpointError, match=message):
        load_source(checkpoint)


def test_config_not_json(checkpoint):
    (checkpoint / CONFIG_NAME).write_text("{'class': 'HybridModel'}")
    with pytest.raises(CheckpointError, match="is not valid JSON"):
        load_source(checkpoint)


def test_no_weights(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights: expected model.safetensors or model.pt"):
        load_source(checkpoint)


def test_truncated_weights(checkpoint):
    data = (checkpoint / "model.safetensors").read_bytes()
    (checkpoint / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file.*truncated"):
        load_source(checkpoint)


def test_pickled_module_instead_of_state_dict(checkpoint):
    (checkpoint / "model.safetensors").unlink()
    torch.save(random_model(CLASS), checkpoint / "model.pt")
    with pytest.raises(CheckpointError, match=r"save it with torch\.save\(model\.state_dict\(\), 'model\.pt'\)"):
        load_source(checkpoint)


def test_errors_are_s2s_errors():
    """The CLIs print S2SError subclasses as one line and exit 1."""
    assert issubclass(CheckpointError, S2SError) and issubclass(UnsupportedModelError, S2SError)


def test_s2s_export_prints_one_line_and_exits_1(checkpoint, tmp_path_factory):
    from exporter.cli import main

    _edit_config(checkpoint, args=dict(ARGS[CLASS], vocab_size=60))
    output = tmp_path_factory.mktemp("out") / "export"
    result = CliRunner().invoke(main, [str(checkpoint), "-o", str(output)])
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "embedding.weight [48, 16] (model: [60, 16])" in result.output
    assert "Traceback" not in result.output and not output.exists()
