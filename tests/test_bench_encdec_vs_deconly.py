"""bench/encdec_vs_deconly.py on two tiny trained checkpoints: its exact match is the PyTorch reference's,
and the table holds both models (timings are measured, never asserted)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from tokenizers import Tokenizer

from bench.encdec_vs_deconly import compare, main, table
from models.checkpoint import load_checkpoint
from models.evaluate import exact_match, predict
from models.tasks import held_out_examples
from models.train import MAX_NEW_TOKENS, train
from tests.custom_models import torch_threads

pytestmark = pytest.mark.slow  # trains and exports two checkpoints

TINY = dict(d_model=16, heads=2, layers=1, batch_size=8, held_out_per_task=1, log=lambda _: None)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("encdec-vs-deconly")
    with torch_threads(1):
        train(root / "encdec", "EfficientInstructionLLM", steps=30, **TINY)
        train(root / "deconly", "SimpleDecoderOnly", steps=30, **TINY)
    return {"encoder-decoder": root / "encdec", "decoder-only": root / "deconly"}


def test_exact_match_is_the_references(checkpoints, tmp_path):
    with torch_threads(1):
        rows = compare(checkpoints, tmp_path, threads=1, held_out_per_task=2, num_beams=2, latency_calls=2,
                       batch_size=4, rounds=1)
    held_out = held_out_examples(2)
    sources, targets = [s for s, _ in held_out], [t for _, t in held_out]
    assert [r.name for r in rows] == list(checkpoints)
    for row, checkpoint_dir in zip(rows, checkpoints.values()):
        checkpoint = load_checkpoint(checkpoint_dir)
        tokenizer = Tokenizer.from_file(str(checkpoint.tokenizer_file))
        for beams, measured in ((1, row.exact_match_greedy), (2, row.exact_match_beam)):
            answers = predict(checkpoint.model, tokenizer, checkpoint.config.special_tokens, sources,
                              max_new_tokens=MAX_NEW_TOKENS, num_beams=beams)
            assert measured == exact_match(answers, targets)
        assert row.parameters == sum(p.numel() for p in checkpoint.model.parameters())
        assert row.batch1_median_ms > 0 and row.batch_median_ms > 0
    lines = table(rows, 2, 4).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| encoder-decoder | EfficientInstructionLLM |")


def test_cli_prints_the_table(checkpoints):
    result = CliRunner().invoke(main, ["--decoder-only", str(checkpoints["decoder-only"]), "--encoder-decoder",
                                       str(checkpoints["encoder-decoder"]), "--threads", "1", "--held-out-per-task",
                                       "1", "--latency-calls", "2", "--batch-size", "2", "--rounds", "1",
                                       "--num-beams", "2"])
    assert result.exit_code == 0, result.output
    assert "| decoder-only | SimpleDecoderOnly |" in result.output and "load average" in result.output
