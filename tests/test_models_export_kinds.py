"""Decoder-only models and the regressor through s2s-export and the runtime.

The exports are validated by s2s-export itself (logits and tokens, or outputs, against PyTorch); here
the runtime's `generate` (greedy and beam, left-padded prompts) must return the tokens of the models/
reference `generate_from_prompt`, and the regressor's `forward` and `rollout` its PyTorch outputs within
1e-5 (float32 LSTMs in another kernel; measured ~1e-7).
"""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner

import runtime
from exporter import export
from exporter.errors import GraphPassError
from exporter.sources import load_source
from models.checkpoint import CONFIG_NAME, CheckpointError
from models.generate import generate_from_prompt
from runtime.cli import main as run_main
from runtime.decoder_only import DecoderOnlyModel
from runtime.errors import ExportDirError, InvalidInputError, InvalidOptionError
from runtime.manifest import DECODER_ONLY, REGRESSOR, Manifest
from runtime.regressor import RegressorModel
from tests.cli_asserts import assert_one_line_error
from tests.custom_models import VOCAB, torch_threads
from tests.lm_models import (
    LM_CLASSES,
    LM_TOKENS,
    MAX_NEW_TOKENS,
    REGRESSOR_ARGS,
    random_lm,
    random_regressor,
    sample_prompts,
    write_lm_checkpoint,
    write_regressor_checkpoint,
)

REGRESSOR_ATOL = 1e-5
# slow: exports models/ checkpoints
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:enable_nested_tensor is True")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """name -> export dir, for each decoder-only class and regressor variant, exported once with
    s2s-export's API (which validates against PyTorch before it writes the directory)."""
    result = {}
    with torch_threads(1):
        for name, write in [(c, write_lm_checkpoint) for c in LM_CLASSES] + \
                           [(v, write_regressor_checkpoint) for v in REGRESSOR_ARGS]:
            root = tmp_path_factory.mktemp(name)
            report = export(write(name, root / "checkpoint"), root / "export")
            assert all(c.ok for c in report.validation.comparisons) and report.validation.tokens_match
            result[name] = report.output
    return result


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: more threads only contend (the machine is shared)."""
    with torch_threads(1):
        yield


def _load(export_dir):
    return runtime.load(export_dir, provider="cpu", threads=1)


# -- decoder-only -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("class_name", LM_CLASSES)
def test_decoder_only_graph_follows_the_contract(exported, class_name):
    manifest = Manifest.read(exported[class_name])
    assert (manifest.kind, manifest.encoder_file, manifest.decoder_start_token_id) == (DECODER_ONLY, None, None)
    assert (manifest.pad_token_id, manifest.eos_token_ids, manifest.vocab_size) == (0, (2,), VOCAB)
    assert all((s.kind, s.init) == ("grows", "empty") for s in manifest.states)
    session = ort.InferenceSession(str(exported[class_name] / manifest.decoder_file),
                                   providers=["CPUExecutionProvider"])
    inputs = {i.name: i.shape for i in session.get_inputs()}
    assert set(inputs) == {"input_ids", "attention_mask"} | {s.input_name for s in manifest.states}
    assert all(isinstance(dim, str) for dim in inputs["input_ids"])  # rows and new_len: the prompt, then 1
    assert isinstance(_load(exported[class_name]), DecoderOnlyModel)


@pytest.mark.parametrize("options", [dict(num_beams=1), dict(num_beams=4, num_return_sequences=2),
                                     dict(num_beams=3, length_penalty=0.6, early_stopping=True),
                                     dict(num_beams=3, num_return_sequences=3, length_penalty=2.0,
                                          early_stopping="never")],
                         ids=["greedy", "beam4x2", "beam3-lp-early", "beam3x3-never"])
@pytest.mark.parametrize("class_name", LM_CLASSES)
def test_runtime_generate_equals_reference(exported, class_name, options):
    prompt_ids, attention_mask = sample_prompts()
    expected = generate_from_prompt(random_lm(class_name), prompt_ids, attention_mask, max_new_tokens=MAX_NEW_TOKENS,
                                    **LM_TOKENS, **options)
    got = _load(exported[class_name]).generate(prompt_ids.numpy(), attention_mask.numpy(),
                                               max_new_tokens=MAX_NEW_TOKENS, **options)
    np.testing.assert_array_equal(got, expected.numpy())


def test_padded_rows_generate_what_they_generate_alone(exported):
    model = _load(exported["SimpleDecoderOnly"])
    prompt_ids, attention_mask = (t.numpy() for t in sample_prompts())
    batched = model.generate(prompt_ids, attention_mask, max_new_tokens=MAX_NEW_TOKENS)
    for row in range(prompt_ids.shape[0]):
        real = attention_mask[row].astype(bool)
        alone = model.generate(prompt_ids[row, real], max_new_tokens=MAX_NEW_TOKENS)[0]
        continuation = batched[row, prompt_ids.shape[1]:]
        np.testing.assert_array_equal(continuation[: alone.size - real.sum()], alone[real.sum():])
        assert (continuation[alone.size - real.sum():] == LM_TOKENS["pad_token_id"]).all()


def test_one_token_prompts_and_streaming(exported):
    """A prompt of one token runs no prompt pass; streaming yields what generate returns."""
    model = _load(exported["DecoderOnly"])
    prompt_ids = np.array([[5], [9], [17]], dtype=np.int64)
    expected = generate_from_prompt(random_lm("DecoderOnly"), torch.from_numpy(prompt_ids),
                                    max_new_tokens=MAX_NEW_TOKENS, **LM_TOKENS).numpy()
    np.testing.assert_array_equal(model.generate(prompt_ids, max_new_tokens=MAX_NEW_TOKENS), expected)
    streamed = np.stack(list(model.stream(prompt_ids, max_new_tokens=MAX_NEW_TOKENS)), axis=1)
    np.testing.assert_array_equal(streamed, expected[:, 1:])


def test_max_and_min_length_count_the_prompt(exported):
    """As in transformers' decoder-only generate: max_length=prompt_len + 5 makes 5 new tokens."""
    model = _load(exported["SimpleDecoderOnly"])
    prompt_ids, attention_mask = (t.numpy() for t in sample_prompts())
    by_total = model.generate(prompt_ids, attention_mask, max_length=prompt_ids.shape[1] + 5, min_length=9)
    by_new = model.generate(prompt_ids, attention_mask, max_new_tokens=5, min_new_tokens=2)
    np.testing.assert_array_equal(by_total, by_new)
    with pytest.raises(InvalidOptionError, match="max_length=7 counts the prompt"):
        model.generate(prompt_ids, attention_mask, max_length=7)


def test_decoder_only_refuses_what_it_cannot_do(exported):
    model = _load(exported["SimpleDecoderOnly"])
    prompt_ids, attention_mask = (t.numpy() for t in sample_prompts())
    with pytest.raises(InvalidInputError, match="padded on the left"):
        model.generate(prompt_ids[:, ::-1], attention_mask[:, ::-1])
    with pytest.raises(InvalidOptionError, match="repetition_penalty=1.5: decoder-only generation does not support"):
        model.generate(prompt_ids, attention_mask, repetition_penalty=1.5)
    with pytest.raises(InvalidInputError, match=r"must lie in \[0, 48\)"):
        model.generate(prompt_ids + VOCAB)
    with pytest.raises(ExportDirError, match="holds a decoder-only model, not an encoder-decoder"):
        runtime.Model(exported["SimpleDecoderOnly"])


@pytest.mark.parametrize("name", ["SimpleDecoderOnly", "fed-back"])
def test_s2s_run_refuses_other_kinds_in_one_line(exported, name):
    kind = Manifest.read(exported[name]).kind
    result = CliRunner().invoke(run_main, [str(exported[name]), "hello", "--provider", "cpu"])
    assert_one_line_error(result, f"holds a {kind} model", "s2s-run generates text with encoder-decoder exports")


@pytest.mark.parametrize("name", ["SimpleDecoderOnly", "fed-back"])
def test_s2s_serve_refuses_other_kinds_in_one_line(exported, name):
    """In a subprocess: s2s-serve configures the process's logging."""
    kind = Manifest.read(exported[name]).kind
    result = subprocess.run([str(Path(sys.executable).parent / "s2s-serve"), str(exported[name]), "--provider", "cpu",
                             "--port", "0"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"Error: {str(exported[name])!r} holds a {kind} model; s2s-serve serves encoder-decoder exports"]


def test_decoder_only_model_pickles_as_its_directory(exported):
    model = _load(exported["SimpleDecoderOnly"])
    prompt_ids, attention_mask = (t.numpy() for t in sample_prompts())
    copy = pickle.loads(pickle.dumps(model))
    assert isinstance(copy, DecoderOnlyModel) and copy.export_dir == model.export_dir
    np.testing.assert_array_equal(copy.generate(prompt_ids, attention_mask, num_beams=2),
                                  model.generate(prompt_ids, attention_mask, num_beams=2))


def test_fp16_refuses_decoder_only_models(tmp_path):
    checkpoint = write_lm_checkpoint("SimpleDecoderOnly", tmp_path / "checkpoint")
    with pytest.raises(GraphPassError, match="converts encoder-decoder exports only, not a decoder-only model"):
        export(checkpoint, tmp_path / "out", dtype="fp16")
    assert not (tmp_path / "out").exists()


# -- regressor -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(REGRESSOR_ARGS))
def test_regressor_forward_and_rollout_equal_pytorch(exported, variant):
    model = _load(exported[variant])
    assert isinstance(model, RegressorModel) and Manifest.read(exported[variant]).kind == REGRESSOR
    reference = random_regressor(variant)
    args = REGRESSOR_ARGS[variant]
    rng = np.random.default_rng(3)
    src = rng.standard_normal((3, 9, args["input_dim"])).astype(np.float32)  # sizes the trace did not use
    trg = rng.standard_normal((3, 4, args["hidden_dim"])).astype(np.float32)
    start = rng.standard_normal((3, args["hidden_dim"])).astype(np.float32)
    projection = rng.standard_normal((args["output_dim"], args["hidden_dim"])).astype(np.float32)
    with torch.no_grad():
        expected_forward = reference(torch.from_numpy(src), torch.from_numpy(trg)).numpy()
        feedback = None if args["output_dim"] == args["hidden_dim"] else \
            (lambda output: output @ torch.from_numpy(projection))
        expected_rollout = reference.rollout(torch.from_numpy(src), 7, start=torch.from_numpy(start),
                                             feedback=feedback).numpy()
    np.testing.assert_allclose(model.forward(src, trg), expected_forward, rtol=0, atol=REGRESSOR_ATOL)
    got = model.rollout(src, 7, start=start, feedback=None if feedback is None else (lambda out: out @ projection))
    np.testing.assert_allclose(got, expected_rollout, rtol=0, atol=REGRESSOR_ATOL)


def test_regressor_rollout_defaults_to_a_zero_start(exported):
    src = np.random.default_rng(4).standard_normal((2, 5, 3)).astype(np.float32)
    with torch.no_grad():
        expected = random_regressor("fed-back").rollout(torch.from_numpy(src), 4).numpy()
    np.testing.assert_allclose(_load(exported["fed-back"]).rollout(src, 4), expected, rtol=0, atol=REGRESSOR_ATOL)


def test_regressor_errors_name_the_fix(exported):
    model = _load(exported["projected"])
    src = np.zeros((2, 5, 3), dtype=np.float32)
    with pytest.raises(InvalidOptionError, match=r"cannot be fed back.*pass feedback="):
        model.rollout(src, 3)
    with pytest.raises(InvalidInputError, match=r"src must be a numeric array \[batch, length, 3\]"):
        model.forward(np.zeros((2, 5, 4), dtype=np.float32), np.zeros((2, 3, 8), dtype=np.float32))
    with pytest.raises(InvalidInputError, match="feedback returned shape"):
        model.rollout(src, 3, feedback=lambda out: out)
    with pytest.raises(InvalidOptionError, match="steps=0"):
        model.rollout(src, 0, feedback=lambda out: np.zeros((2, 8)))


def test_regressor_checkpoint_takes_no_generation_defaults(tmp_path):
    checkpoint = write_regressor_checkpoint("fed-back", tmp_path)
    config = json.loads((checkpoint / CONFIG_NAME).read_text())
    (checkpoint / CONFIG_NAME).write_text(json.dumps(dict(config, generation={"max_new_tokens": 4})))
    with pytest.raises(CheckpointError, match="generates no tokens, so it takes no 'generation' defaults"):
        load_source(checkpoint)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_min_new_tokens_hold_eos_back_after_the_prompt(exported, num_beams):
    """min_new_tokens counts from the prompt's end in every search: EOS, which some rows pick within
    their first 3 new tokens unconstrained, appears in none of them with min_new_tokens=3."""
    model = _load(exported["SimpleDecoderOnly"])
    prompt_ids, attention_mask = (t.numpy() for t in sample_prompts())
    eos, start = LM_TOKENS["eos_token_id"], prompt_ids.shape[1]
    free = model.generate(prompt_ids, attention_mask, max_new_tokens=8, num_beams=num_beams)
    held = model.generate(prompt_ids, attention_mask, max_new_tokens=8, min_new_tokens=3, num_beams=num_beams)
    assert (free[:, start:start + 3] == eos).any()
    assert not (held[:, start:start + 3] == eos).any()
    if num_beams == 1:  # greedy rows that pick no EOS early are not touched by the rule (nor held back longer)
        untouched = ~(free[:, start:start + 3] == eos).any(axis=1)
        assert untouched.any()
        np.testing.assert_array_equal(held[untouched, :free.shape[1]], free[untouched])
