"""Test-only: tiny random-weight models of each models/ architecture, and their checkpoint directories.

Random weights at torch's default init give one token forever, whatever the input. The transformers'
weights (but the embedding) are therefore scaled up, so that outputs depend on the input, and the EOS
bias is raised until EOS would be the greedy choice at about a quarter of the positions, so that rows
of a batch end at different steps and beam search finishes hypotheses along the way.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from models.checkpoint import ModelConfig, save_checkpoint
from models.generate import generate

VOCAB = 48
TOKENS = {"pad_token_id": 0, "decoder_start_token_id": 1, "eos_token_id": 2}
ARGS = {
    "EncoderDecoder": dict(vocab_size=VOCAB, hidden_size=16),
    "EnhancedEncoderDecoder": dict(vocab_size=VOCAB, hidden_size=16),
    "InstructionLLM": dict(vocab_size=VOCAB, d_model=16, nhead=2, num_encoder_layers=2, num_decoder_layers=2,
                           dim_feedforward=32),
    "HybridModel": dict(vocab_size=VOCAB, d_model=16, nhead=4, num_encoder_layers=1, num_decoder_layers=2,
                        dim_feedforward=24),
    "EfficientInstructionLLM": dict(vocab_size=VOCAB, d_model=16, nhead=2, num_layers=2),
}
CLASSES = tuple(ARGS)
MAX_NEW_TOKENS = 12
# Random weights times this (the embedding excepted): input-dependent outputs for the transformers; the
# LSTMs saturate above 1 into fixed points where different beams tie exactly, which no search can order.
WEIGHT_SCALE = {"EncoderDecoder": 1.0, "EnhancedEncoderDecoder": 1.0, "InstructionLLM": 2.0, "HybridModel": 2.0,
                "EfficientInstructionLLM": 2.0}


def sample_batch(batch: int = 4, src_len: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask: [batch, src_len] int64, rows of different lengths padded on the right."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (batch, src_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    for row in range(1, batch):
        attention_mask[row, max(1, src_len - 3 * row):] = 0
    return input_ids.masked_fill(attention_mask == 0, TOKENS["pad_token_id"]), attention_mask


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run with `count` torch threads. Tiny models gain nothing from more, and on a shared machine their
    threads wait for each other's cores."""
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def random_model(class_name: str) -> nn.Module:
    """An eval-mode model of `class_name` whose greedy output depends on its input and ends at varied steps
    (a fresh copy each call: tests may change it)."""
    model = ModelConfig(class_name, ARGS[class_name], TOKENS).build().eval()
    model.load_state_dict(_random_weights(class_name))
    return model


@functools.cache
def _random_weights(class_name: str) -> dict[str, torch.Tensor]:
    with torch.random.fork_rng(devices=[]), torch_threads(1):
        torch.manual_seed(0)
        model = ModelConfig(class_name, ARGS[class_name], TOKENS).build().eval()
        _scale_and_tune_eos(model)
    return model.state_dict()


def _scale_and_tune_eos(model: nn.Module) -> None:
    eos = TOKENS["eos_token_id"]
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name != "embedding.weight":  # N(0, 1) already
                parameter.mul_(WEIGHT_SCALE[type(model).__name__])
        input_ids, attention_mask = sample_batch()
        sequences = generate(model, input_ids, attention_mask, max_new_tokens=MAX_NEW_TOKENS, **TOKENS)
        logits = model.full_forward(input_ids, attention_mask, sequences[:, :-1])
        gap = (logits.max(dim=-1).values - logits[..., eos]).flatten()
        model.fc_out.bias[eos] += torch.quantile(gap, 0.25)


def write_checkpoint(class_name: str, path: Path) -> Path:
    """The checkpoint directory of `random_model(class_name)` (no tokenizer)."""
    save_checkpoint(random_model(class_name), ModelConfig(class_name, ARGS[class_name], TOKENS), path)
    return path
