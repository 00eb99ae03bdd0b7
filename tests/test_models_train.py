"""s2s-train and its data: the instruction mix, the tokenizer, and the checkpoints it writes."""

from __future__ import annotations

import random

import pytest
from click.testing import CliRunner

from models.checkpoint import load_checkpoint
from models.tasks import TASKS, held_out_examples, make_example, number_to_words, training_batches
from models.tokenizer import train_tokenizer
from models.train import main, train
from tests.custom_models import torch_threads

TINY = dict(d_model=16, heads=2, layers=1, batch_size=8)


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.mark.parametrize("n, words", [  # no oracle for English number words: stored answers
    (0, "zero"), (13, "thirteen"), (40, "forty"), (90, "ninety"), (21, "twenty-one"), (100, "one hundred"),
    (109, "one hundred nine"), (4721, "four thousand seven hundred twenty-one"), (7000, "seven thousand"),
    (9999, "nine thousand nine hundred ninety-nine"),
])
def test_number_to_words(n, words):
    assert number_to_words(n) == words


def test_training_stream_never_yields_held_out_instructions():
    held_out = held_out_examples(25)
    excluded = {source for source, _ in held_out}
    assert len(excluded) == 100 and [s.split(":")[0] for s, _ in held_out[::25]] == list(TASKS)
    batches = training_batches(64, excluded, seed=3)
    assert not any(source in excluded for _ in range(30) for source, _ in next(batches))


def test_tokenizer_round_trips_the_mix():
    """Exact match compares decoded text: decoding must give back every instruction and answer."""
    rng = random.Random(0)
    pairs = [make_example(rng, task) for task in TASKS for _ in range(200)]
    tokenizer = train_tokenizer(text for pair in pairs for text in pair)
    for source, target in pairs:
        assert tokenizer.decode(tokenizer.encode(source).ids, skip_special_tokens=True) == source
        assert tokenizer.encode(source).tokens[-1] == "</s>"  # EOS appended to inputs, like T5
        assert tokenizer.decode(tokenizer.encode(target, add_special_tokens=False).ids) == target
    assert [tokenizer.id_to_token(i) for i in range(4)] == ["<pad>", "<s>", "</s>", "<unk>"]


@pytest.mark.slow
def test_train_writes_a_loadable_checkpoint(tmp_path):
    accuracy = train(tmp_path, "HybridModel", steps=3, held_out_per_task=2, log=lambda _: None, **TINY)
    assert 0.0 <= accuracy <= 1.0
    checkpoint = load_checkpoint(tmp_path)
    assert checkpoint.config.class_name == "HybridModel" and checkpoint.tokenizer_file is not None
    assert checkpoint.config.special_tokens == {"pad_token_id": 0, "decoder_start_token_id": 1, "eos_token_id": 2}


@pytest.mark.slow
def test_train_t5_writes_a_transformers_checkpoint(tmp_path):
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    train(tmp_path, "t5", steps=2, held_out_per_task=1, log=lambda _: None, **TINY)
    model = T5ForConditionalGeneration.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    assert model.config.decoder_start_token_id == tokenizer.pad_token_id == 0
    assert tokenizer("spell out: 12").input_ids[-1] == model.config.eos_token_id


@pytest.mark.slow
def test_cli(tmp_path):
    result = CliRunner().invoke(main, ["-o", str(tmp_path), "--model", "EncoderDecoder", "--d-model", "16",
                                       "--steps", "2", "--batch-size", "4", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "held-out exact match (greedy, 400 instructions)" in result.output
    assert load_checkpoint(tmp_path).config.class_name == "EncoderDecoder"
