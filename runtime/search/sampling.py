"""Multinomial sampling: each step draws the next token from softmax(scores) after the rules and warpers.

The loop is greedy search's (`greedy.token_by_token`) with the argmax replaced by a draw. Draws come from
`np.random.default_rng(options.seed)`, made per call: a fixed seed gives the same tokens on every
run, but not the tokens of torch's RNG in transformers (no numpy generator reproduces
`torch.multinomial`); parity with transformers holds for the distribution, not the draws.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from runtime.options import GenerationOptions
from runtime.search import DecoderStep, LogitsRule
from runtime.search.greedy import token_by_token


def sample_search(step: DecoderStep, start_ids: np.ndarray, rules: list[LogitsRule], warpers: list[LogitsRule],
                  options: GenerationOptions) -> Iterator[np.ndarray]:
    """Yield next ids, [batch] int64, once per step, until every row has emitted EOS or max length.

    start_ids: [batch] int64, the decoder start token of each row. Rules then warpers edit the
    scores in that order (transformers appends its warpers after its processors). A finished row
    yields pad and is dropped from the decoder (`step.select`), as in greedy search.
    """
    rng = np.random.default_rng(options.seed)
    # transformers appends its warpers after its processors: one list, rules first
    # next_tokens = torch.multinomial(softmax(next_token_scores), 1)
    return token_by_token(step, start_ids, [*rules, *warpers], options, lambda scores: draw(scores, rng))


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
