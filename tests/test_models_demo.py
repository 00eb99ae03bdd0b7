"""The bundled demo model (models/demo/): exported with the s2s-export API, it answers the held-out
instructions at >= 95% exact match, with the same tokens as the PyTorch reference generate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

import runtime
from demo import DEMO_DIR, HELD_OUT_PER_TASK
from exporter import export
from models.checkpoint import load_checkpoint
from models.evaluate import encode_sources, exact_match
from models.generate import generate
from models.tasks import held_out_examples
from tests.custom_models import torch_threads

pytestmark = pytest.mark.slow  # exports the demo model


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(checkpoint, runtime model, held-out examples); export validated against PyTorch by the API."""
    with torch_threads(1):
        report = export(DEMO_DIR, tmp_path_factory.mktemp("demo") / "export")
    assert report.validation.tokens_match
    return load_checkpoint(DEMO_DIR), runtime.load(report.output, provider="cpu", threads=1), \
        held_out_examples(HELD_OUT_PER_TASK)


def test_demo_model_is_small():
    assert sum(p.stat().st_size for p in DEMO_DIR.iterdir()) < 6_000_000


def test_held_out_exact_match_at_least_95_percent(demo):
    _, model, held_out = demo
    answers = model.generate_text([source for source, _ in held_out])
    assert exact_match(answers, [target for _, target in held_out]) >= 0.95


@pytest.mark.parametrize("options", [dict(num_beams=1), dict(num_beams=4, num_return_sequences=2)],
                         ids=["greedy", "beam4x2"])
def test_runtime_equals_reference_generate(demo, options):
    checkpoint, model, held_out = demo
    sources = [source for source, _ in held_out[::8]]  # 50 instructions, every task
    input_ids, attention_mask = encode_sources(Tokenizer.from_file(str(checkpoint.tokenizer_file)), sources)
    with torch_threads(1):
        expected = generate(checkpoint.model, torch.from_numpy(input_ids), torch.from_numpy(attention_mask),
                            max_new_tokens=16, **checkpoint.config.special_tokens, **options)
    got = model.generate(input_ids, attention_mask, max_new_tokens=16, **options)
    np.testing.assert_array_equal(got, expected.numpy())
