"""Greedy search: the argmax token each step, until every row has emitted EOS or max length.

`token_by_token` is the loop greedy search and sampling share; they differ only in how a row's next
token is chosen from its scores.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from runtime.options import GenerationOptions
from runtime.search import DecoderStep, LogitsRule

# scores: [rows, vocab] float32 -> next ids [rows] int64
ChooseToken = Callable[[np.ndarray], np.ndarray]


def greedy_search(step: DecoderStep, start_ids: np.ndarray, rules: list[LogitsRule],
                  options: GenerationOptions) -> Iterator[np.ndarray]:
    """Yield next ids, [batch] int64, once per step, until every row has emitted EOS.

    start_ids: [batch] int64, the decoder start token of each row.
    """
    # next_tokens = torch.argmax(next_token_scores, dim=-1)
    return token_by_token(step, start_ids, rules, options, lambda scores: scores.argmax(axis=-1))


def token_by_token(step: DecoderStep, start_ids: np.ndarray, rules: list[LogitsRule], options: GenerationOptions,
                   choose: ChooseToken) -> Iterator[np.ndarray]:
    """The one-token-per-step loop: run the step, apply the rules, choose, yield, drop finished rows.

    A finished row yields pad, like transformers (`next_tokens * unfinished + pad * (1 - unfinished)`).
    Finished rows are dropped from the decoder (`step.select`), so they stop costing graph work.
    """
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
        if rules:
            # a view while every row runs; a gathered copy once rows have been dropped
            seen = sequences[:, :cur_len] if active.shape[0] == batch else sequences[active, :cur_len]
            for rule in rules:
                rule(seen, scores)
        next_ids = choose(scores)
        sequences[active, cur_len] = next_ids
        out.fill(pad)
        out[active] = next_ids
        yield out.copy()
        # one EOS id (the usual case): a plain compare; np.isin was most of the loop's own time (py-spy)
        running = next_ids != eos[0] if eos.size == 1 else ~np.isin(next_ids, eos)
        if not running.all():
            if not running.any():
                return
            keep = np.flatnonzero(running)
            step.select(keep)
            active, next_ids = active[keep], next_ids[keep]
        last_ids = next_ids
