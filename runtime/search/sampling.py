"""Multinomial sampling: each step draws the next token from softmax(scores) after the rules and warpers.

The loop is greedy search's (`greedy.py`) with the argmax replaced by a draw. Draws come from
`np.random.default_rng(options.seed)`, made per call: a fixed seed gives the same tokens on every
run, but not the tokens of torch's RNG in transformers (no numpy generator reproduces
`torch.multinomial`); parity with transformers holds for the distribution, not the draws.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from runtime.options import GenerationOptions
from runtime.search import DecoderStep, LogitsRule


def sample_search(step: DecoderStep, start_ids: np.ndarray, rules: list[LogitsRule], warpers: list[LogitsRule],
                  options: GenerationOptions) -> Iterator[np.ndarray]:
    """Yield next ids, [batch] int64, once per step, until every row has emitted EOS or max length.

    start_ids: [batch] int64, the decoder start token of each row. Rules then warpers edit the
    scores in that order (transformers appends its warpers after its processors). A finished row
    yields pad and is dropped from the decoder (`step.select`), as in greedy search.
    """
    rng = np.random.default_rng(options.seed)
    batch = start_ids.shape[0]
    max_len = options.total_max_length()
    eos = np.asarray(options.eos_token_ids, dtype=np.int64)
    pad = options.pad_token_id
    sequences = np.full((batch, max_len), pad, dtype=np.int64)  # [batch, max_len]
    sequences[:, 0] = start_ids
    active = np.arange(batch)  # batch index of each decoder row still running
    last_ids = start_ids.astype(np.int64)  # [rows]
    out = np.empty(batch, dtype=np.int64)
    for cur_len in range(1, max_len):
        scores = step(last_ids)  # [rows, vocab] float32
        if rules or warpers:
            seen = sequences[active, :cur_len]  # [rows, cur_len]
            for rule in rules:
                rule(seen, scores)
            for warper in warpers:
                warper(seen, scores)
        next_ids = draw(scores, rng)  # next_tokens = torch.multinomial(softmax(next_token_scores), 1)
        sequences[active, cur_len] = next_ids
        out.fill(pad)
        out[active] = next_ids
        yield out.copy()
        running = ~np.isin(next_ids, eos)
        if not running.all():
            if not running.any():
                return
            keep = np.flatnonzero(running)
            step.select(keep)
            active, next_ids = active[keep], next_ids[keep]
        last_ids = next_ids


def draw(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row from softmax(scores). scores: [rows, vocab] float32 -> [rows] int64.

    Inverse-CDF sampling: a token with probability 0 (score -inf) is never drawn, since the
    cumulative mass does not rise at it.
    """
    probs = np.exp(scores - scores.max(axis=1, keepdims=True), dtype=np.float64)  # [rows, vocab], unnormalised
    cdf = np.cumsum(probs, axis=1)
    total = cdf[:, -1]
    # uniform in [0, total); the product can round up to total itself, which would index past the vocab
    targets = np.minimum(rng.random(scores.shape[0]) * total, np.nextafter(total, 0))  # [rows]
    return (cdf <= targets[:, None]).sum(axis=1).astype(np.int64)
