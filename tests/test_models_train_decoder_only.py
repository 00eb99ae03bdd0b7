"""s2s-train on a decoder-only model: its batches, its checkpoint, and the runtime's text answers."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from tokenizers import Tokenizer

import runtime
from exporter import export
from models.checkpoint import load_checkpoint
from models.evaluate import encode_prompts, encode_sources, predict
from models.tasks import held_out_examples
from models.tokenizer import special_token_ids, train_tokenizer
from models.train import MAX_NEW_TOKENS, _lm_batch_tensors, main, train
from tests.custom_models import torch_threads

pytestmark = pytest.mark.slow  # trains and exports

TINY = dict(d_model=16, heads=2, layers=1, batch_size=8)
PAIRS = [("reverse: apple river", "river apple"), ("sort: q d x", "d q x")]


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(text for pair in PAIRS * 20 for text in pair)


def test_lm_batches_learn_the_answer_only(tokenizer):
    tokens = special_token_ids(tokenizer)
    input_ids, attention_mask, labels = _lm_batch_tensors(tokenizer, PAIRS, tokens["pad_token_id"],
                                                          tokens["eos_token_id"])
    for row, (source, target) in enumerate(PAIRS):
        source_ids = tokenizer.encode(source).ids  # ends with the EOS the tokenizer appends
        answer_ids = tokenizer.encode(target, add_special_tokens=False).ids + [tokens["eos_token_id"]]
        length = len(source_ids) + len(answer_ids) - 1
        assert input_ids[row, :length].tolist() == (source_ids + answer_ids)[:-1]
        assert attention_mask[row].tolist() == [1] * length + [0] * (input_ids.shape[1] - length)
        learned = labels[row] != -100
        assert labels[row, learned].tolist() == answer_ids  # the instruction and the padding are not learned
        assert learned.nonzero()[0].item() == len(source_ids) - 1  # the answer's first token follows the EOS


def test_prompts_are_the_sources_padded_on_the_left(tokenizer):
    sources = [s for s, _ in PAIRS] + ["sort: q"]
    input_ids, mask = encode_sources(tokenizer, sources)
    prompt_ids, prompt_mask = encode_prompts(tokenizer, sources)
    for row in range(len(sources)):
        assert prompt_ids[row, prompt_mask[row] == 1].tolist() == input_ids[row, mask[row] == 1].tolist()
        assert prompt_mask[row, -1] == 1


def test_trained_decoder_only_answers_the_same_on_the_runtime(tmp_path):
    """Train a few steps, export (validated), and the runtime's generate_text (its tokenizer, left padding)
    gives the reference's answers."""
    train(tmp_path / "checkpoint", "SimpleDecoderOnly", steps=3, held_out_per_task=2, log=lambda _: None, **TINY)
    checkpoint = load_checkpoint(tmp_path / "checkpoint")
    assert checkpoint.config.special_tokens == {"pad_token_id": 0, "eos_token_id": 2}
    export(tmp_path / "checkpoint", tmp_path / "export")
    sources = [s for s, _ in held_out_examples(2)]
    expected = predict(checkpoint.model, Tokenizer.from_file(str(checkpoint.tokenizer_file)),
                       checkpoint.config.special_tokens, sources, max_new_tokens=MAX_NEW_TOKENS)
    model = runtime.load(tmp_path / "export", provider="cpu", threads=1)
    assert model.generate_text(sources) == expected


def test_cli_trains_token_models_only(tmp_path):
    result = CliRunner().invoke(main, ["-o", str(tmp_path), "--model", "SimpleEncoderDecoder"])
    assert result.exit_code == 2 and "'SimpleEncoderDecoder' is not one of" in result.output
    result = CliRunner().invoke(main, ["-o", str(tmp_path), "--model", "DecoderOnly", "--d-model", "16",
                                       "--steps", "1", "--batch-size", "2", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(tmp_path).config.class_name == "DecoderOnly"
