"""Exact-match accuracy on the instruction mix, with the PyTorch reference generate (encoder-decoders and
decoder-only models)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from models.generate import generate, generate_from_prompt
from runtime.manifest import DECODER_ONLY


def encode_sources(tokenizer: Tokenizer, sources: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """sources -> input_ids, attention_mask: [batch, longest] int64, padded on the right with id 0 (<pad>),
    EOS appended by the tokenizer's post-processor: what the runtime's generate_text feeds the encoder."""
    ids = [e.ids for e in tokenizer.encode_batch(list(sources))]
    input_ids = np.zeros((len(ids), max(map(len, ids))), dtype=np.int64)
    attention_mask = np.zeros_like(input_ids)
    for row, seq in enumerate(ids):
        input_ids[row, : len(seq)] = seq
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


def encode_prompts(tokenizer: Tokenizer, sources: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """sources -> a decoder-only model's prompt_ids, attention_mask: [batch, longest] int64, the same
    tokens as `encode_sources` (EOS appended) but padded on the left, with id 0 (<pad>)."""
    input_ids, attention_mask = encode_sources(tokenizer, sources)
    lengths = attention_mask.sum(axis=1)
    for row, length in enumerate(lengths):  # move each row's tokens to the right end
        input_ids[row] = np.roll(input_ids[row], input_ids.shape[1] - length)
        attention_mask[row] = np.roll(attention_mask[row], input_ids.shape[1] - length)
    return input_ids, attention_mask


def predict(model: nn.Module, tokenizer: Tokenizer, special_tokens: dict[str, int], sources: Sequence[str], *,
            max_new_tokens: int, num_beams: int = 1, batch_size: int = 128) -> list[str]:
    """Answers of an eval-mode models/ model, greedy (num_beams=1) or beam search. A decoder-only
    model continues each instruction; its answer is the continuation."""
    decoder_only = getattr(model, "kind", None) == DECODER_ONLY
    answers: list[str] = []
    for start in range(0, len(sources), batch_size):
        batch = sources[start:start + batch_size]
        if decoder_only:
            prompt_ids, attention_mask = encode_prompts(tokenizer, batch)
            sequences = generate_from_prompt(model, torch.from_numpy(prompt_ids), torch.from_numpy(attention_mask),
                                             max_new_tokens=max_new_tokens, num_beams=num_beams, **special_tokens)
            sequences = sequences[:, prompt_ids.shape[1]:]
        else:
            input_ids, attention_mask = encode_sources(tokenizer, batch)
            sequences = generate(model, torch.from_numpy(input_ids), torch.from_numpy(attention_mask),
                                 max_new_tokens=max_new_tokens, num_beams=num_beams, **special_tokens)
        answers += tokenizer.decode_batch(sequences.tolist(), skip_special_tokens=True)
    return answers


def exact_match(predictions: Sequence[str], targets: Sequence[str]) -> float:
    """Fraction of predictions equal to their target, character for character."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    return sum(p == t for p, t in zip(predictions, targets)) / len(targets)
