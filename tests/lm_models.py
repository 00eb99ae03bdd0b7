"""Test-only: tiny random-weight decoder-only models and regressors of models/, and their checkpoints.

As in tests/custom_models.py: the decoder-only models' weights (but the embedding) are scaled up so
that outputs depend on the prompt, and the EOS bias is raised until EOS would be the greedy choice at
about 5% of the positions (these models reach it often on their own), so rows of a batch end at
different steps and beam search finishes hypotheses along the way. Prompts are padded on the left.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from models.checkpoint import ModelConfig, save_checkpoint
from models.generate import generate_from_prompt
from tests.custom_models import VOCAB, torch_threads

LM_TOKENS = {"pad_token_id": 0, "eos_token_id": 2}
LM_ARGS = {
    "SimpleDecoderOnly": dict(vocab_size=VOCAB, d_model=16, nhead=2, num_layers=2, dim_feedforward=32),
    "DecoderOnly": dict(vocab_size=VOCAB, hidden_size=16),  # 8 heads of 2, 6 layers: its fixed shape
}
LM_CLASSES = tuple(LM_ARGS)
MAX_NEW_TOKENS = 12
WEIGHT_SCALE = 1.5
# A regressor whose output feeds back as its next input (output_dim == hidden_dim), and one that needs a
# projection to do so.
REGRESSOR_ARGS = {"fed-back": dict(input_dim=3, hidden_dim=8, output_dim=8),
                  "projected": dict(input_dim=3, hidden_dim=8, output_dim=2)}


def sample_prompts(batch: int = 4, prompt_len: int = 7, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """prompt_ids, attention_mask: [batch, prompt_len] int64, rows of different lengths padded on the left."""
    generator = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, VOCAB, (batch, prompt_len), generator=generator)
    attention_mask = torch.ones_like(prompt_ids)
    for row in range(1, batch):
        attention_mask[row, : min(prompt_len - 1, 2 * row)] = 0
    return prompt_ids.masked_fill(attention_mask == 0, LM_TOKENS["pad_token_id"]), attention_mask


def random_lm(class_name: str) -> nn.Module:
    """An eval-mode decoder-only model whose greedy output depends on its prompt and ends at varied steps
    (a fresh copy each call: tests may change it)."""
    model = ModelConfig(class_name, LM_ARGS[class_name], LM_TOKENS).build().eval()
    model.load_state_dict(_random_lm_weights(class_name))
    return model


@functools.cache
def _random_lm_weights(class_name: str) -> dict[str, torch.Tensor]:
    eos = LM_TOKENS["eos_token_id"]
    with torch.random.fork_rng(devices=[]), torch_threads(1), torch.no_grad():
        torch.manual_seed(0)
        model = ModelConfig(class_name, LM_ARGS[class_name], LM_TOKENS).build().eval()
        for name, parameter in model.named_parameters():
            if name != "embedding.weight":  # N(0, 1) already
                parameter.mul_(WEIGHT_SCALE)
        prompt_ids, attention_mask = sample_prompts()
        sequences = generate_from_prompt(model, prompt_ids, attention_mask, max_new_tokens=MAX_NEW_TOKENS,
                                         **LM_TOKENS)
        mask = torch.cat((attention_mask, torch.ones_like(sequences[:, prompt_ids.shape[1]:])), dim=1)
        logits = model.full_forward(sequences, mask)[:, prompt_ids.shape[1] - 1:-1]  # the generated positions
        gap = (logits.max(dim=-1).values - logits[..., eos]).flatten()
        model.fc_out.bias[eos] += torch.quantile(gap, 0.05)
    return model.state_dict()


def write_lm_checkpoint(class_name: str, path: Path) -> Path:
    """The checkpoint directory of `random_lm(class_name)` (no tokenizer)."""
    save_checkpoint(random_lm(class_name), ModelConfig(class_name, LM_ARGS[class_name], LM_TOKENS), path)
    return path


def random_regressor(variant: str) -> nn.Module:
    """An eval-mode SimpleEncoderDecoder of REGRESSOR_ARGS[variant] at torch's default init, seeded."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        return ModelConfig("SimpleEncoderDecoder", REGRESSOR_ARGS[variant], {}).build().eval()


def write_regressor_checkpoint(variant: str, path: Path) -> Path:
    """A checkpoint with only "class" and "args" in its s2s_model.json (the regressor has no tokens)."""
    save_checkpoint(random_regressor(variant), ModelConfig("SimpleEncoderDecoder", REGRESSOR_ARGS[variant], {}), path)
    return path
