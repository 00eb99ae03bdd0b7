"""Multinomial sampling: each step draws the next token from softmax(scores) after the rules and warpers.

The loop is greedy search's (`greedy.token_steps`) with the argmax replaced by a draw. Draws come from
`np.random.default_rng(options.seed)`, made per call: a fixed seed gives the same tokens on every
run, but not the tokens of torch's RNG in transformers (no numpy generator reproduces
`torch.multinomial`); parity with transformers holds for the distribution, not the draws.

`sample_steps(..., row_seeds=...)` gives each row a generator of its own instead, so a row draws
exactly what a call for its input alone with `seed=row_seeds[row]` draws, whatever else shares the
batch: what a server batching unrelated requests needs.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Sequence

import numpy as np

from runtime.errors import InvalidOptionError
from runtime.options import GenerationOptions
from runtime.search import DecoderStep, LogitsRule
from runtime.search.greedy import TokenStep, token_steps


def sample_search(step: DecoderStep, start_ids: np.ndarray, rules: list[LogitsRule], warpers: list[LogitsRule],
                  options: GenerationOptions) -> Iterator[np.ndarray]:
    """Yield next ids, [batch] int64, once per step, until every row has emitted EOS or max length.

    start_ids: [batch] int64, the decoder start token of each row. Rules then warpers edit the
    scores in that order (transformers appends its warpers after its processors). A finished row
    yields pad and is dropped from the decoder (`step.select`), as in greedy search.
    """
    return (tokens.ids for tokens in sample_steps(step, start_ids, rules, warpers, options))


def sample_steps(step: DecoderStep, start_ids: np.ndarray, rules: list[LogitsRule], warpers: list[LogitsRule],
                 options: GenerationOptions, *, logprobs: bool = False, stop_rows: Collection[int] | None = None,
                 row_seeds: Sequence[int] | None = None) -> Iterator[TokenStep]:
    """`sample_search` yielding `TokenStep`s (see `greedy.token_steps` for logprobs and stop_rows).

    row_seeds: [batch] seeds, one RNG per row (options.seed is then unused); None: one RNG for the
    call, seeded with options.seed. A row's draws are the same either way when it is alone.

    Raises:
        InvalidOptionError: row_seeds does not hold one integer seed >= 0 per row.
    """
    if row_seeds is None:
        rng = np.random.default_rng(options.seed)

        def choose(scores: np.ndarray, active: np.ndarray) -> np.ndarray:
            return draw(scores, rng)
    else:
        if len(row_seeds) != start_ids.shape[0]:
            raise InvalidOptionError(f"row_seeds has {len(row_seeds)} seeds for {start_ids.shape[0]} rows")
        try:
            rngs = [np.random.default_rng(seed) for seed in row_seeds]
        except (TypeError, ValueError):
            raise InvalidOptionError(f"row_seeds {list(row_seeds)!r}: expected integers >= 0") from None

        def choose(scores: np.ndarray, active: np.ndarray) -> np.ndarray:
            # rng.random() draws the same double as rng.random(1)[0]: a lone row's stream
            uniforms = np.fromiter((rngs[row].random() for row in active), dtype=np.float64, count=active.shape[0])
            return draw_with(scores, uniforms)

    # transformers appends its warpers after its processors: one list, rules first
    # next_tokens = torch.multinomial(softmax(next_token_scores), 1)
    return token_steps(step, start_ids, [*rules, *warpers], options, choose, logprobs=logprobs, stop_rows=stop_rows)


def draw(scores: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One token per row from softmax(scores). scores: [rows, vocab] float32 -> [rows] int64."""
    return draw_with(scores, rng.random((scores.shape[0],)))


def draw_with(scores: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """One token per row from softmax(scores), given one uniform draw in [0, 1) per row.

    scores: [rows, vocab] float32; uniforms: [rows] float64. Returns [rows] int64.
    Inverse-CDF sampling: a token with probability 0 (score -inf) is never drawn, since the
    cumulative mass does not rise at it.
    """
    probs = np.exp(scores - scores.max(axis=1, keepdims=True), dtype=np.float64)  # [rows, vocab], unnormalised
    cdf = np.cumsum(probs, axis=1)
    total = cdf[:, -1]
    # uniform in [0, total); the product can round up to total itself, which would index past the vocab
    targets = np.minimum(uniforms * total, np.nextafter(total, 0))  # [rows]
    return (cdf <= targets[:, None]).sum(axis=1).astype(np.int64)
