"""Greedy search: the argmax token each step, until every row has emitted EOS or max length.

`token_steps` is the loop greedy search and sampling share; they differ only in how a row's next
token is chosen from its scores. `greedy_search` yields the ids alone (what `Model.stream` gives);
`greedy_steps` yields `TokenStep`s, with each chosen token's log-probability when asked and rows a
caller ends early (a server's stop sequence, a client that left).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from typing import NamedTuple

import numpy as np

from runtime.options import GenerationOptions
from runtime.search import DecoderStep, LogitsRule

# (scores [rows, vocab] float32, active [rows] int64 batch index of each row) -> next ids [rows] int64
ChooseToken = Callable[[np.ndarray, np.ndarray], np.ndarray]


class TokenStep(NamedTuple):
    """One step of every row of the batch.

    ids: [batch] int64, the token each row chose; pad for rows that had already ended.
    logprobs: [batch] float32, log_softmax of the scores the token was chosen from (after the rules,
    and the warpers when sampling), at the chosen token; 0.0 for rows that had ended. None unless asked.
    """

    ids: np.ndarray
    logprobs: np.ndarray | None


def greedy_search(step: DecoderStep, start_ids: np.ndarray, rules: list[LogitsRule],
                  options: GenerationOptions) -> Iterator[np.ndarray]:
    """Yield next ids, [batch] int64, once per step, until every row has emitted EOS.

    start_ids: [batch] int64, the decoder start token of each row.
    """
    return (tokens.ids for tokens in greedy_steps(step, start_ids, rules, options))


def greedy_steps(step: DecoderStep, start_ids: np.ndarray, rules: list[LogitsRule], options: GenerationOptions, *,
                 logprobs: bool = False, stop_rows: Collection[int] | None = None) -> Iterator[TokenStep]:
    """`greedy_search` yielding `TokenStep`s; see `token_steps` for logprobs and stop_rows."""
    # next_tokens = torch.argmax(next_token_scores, dim=-1)
    return token_steps(step, start_ids, rules, options, lambda scores, active: scores.argmax(axis=-1),
                       logprobs=logprobs, stop_rows=stop_rows)


def token_steps(step: DecoderStep, start_ids: np.ndarray, rules: list[LogitsRule], options: GenerationOptions,
                choose: ChooseToken, *, logprobs: bool = False,
                stop_rows: Collection[int] | None = None) -> Iterator[TokenStep]:
    """The one-token-per-step loop: run the step, apply the rules, choose, yield, drop finished rows.

    A finished row yields pad, like transformers (`next_tokens * unfinished + pad * (1 - unfinished)`).
    Finished rows are dropped from the decoder (`step.select`), so they stop costing graph work.

    logprobs: also yield each chosen token's log-probability (one log-softmax per step; off by default).
    stop_rows: batch indices the caller adds to between steps (the consumer of this generator runs it,
    so no lock is needed); a row in it ends before the next step, like a row that emitted EOS.
    """
    batch = start_ids.shape[0]
    max_len = options.total_max_length()
    eos = np.asarray(options.eos_token_ids, dtype=np.int64)
    eos_one = int(eos[0]) if eos.size == 1 else None  # the usual case: one EOS id, a plain compare
    pad = options.pad_token_id
    sequences = np.full((batch, max_len), pad, dtype=np.int64)  # [batch, max_len]
    sequences[:, 0] = start_ids
    active = np.arange(batch)  # batch index of each decoder row still running
    every_row = True  # active is arange(batch): plain slices instead of gathers (each numpy call counts here:
    # between two decoder runs the interpreter works on caches the graph has just flushed)
    last_ids = start_ids.astype(np.int64)  # [rows]
    for cur_len in range(1, max_len):
        scores = step(last_ids)  # [rows, vocab] float32
        if rules:
            seen = sequences[:, :cur_len] if every_row else sequences[active, :cur_len]
            for rule in rules:
                rule(seen, scores)
        next_ids = choose(scores, active)  # a new array each step
        if every_row:
            sequences[:, cur_len] = next_ids
            ids = next_ids.copy()
        else:
            sequences[active, cur_len] = next_ids
            ids = np.full(batch, pad, dtype=np.int64)
            ids[active] = next_ids
        if logprobs:
            chosen = np.zeros(batch, dtype=np.float32)
            chosen[active] = chosen_logprobs(scores, next_ids)
            yield TokenStep(ids, chosen)
        else:
            yield TokenStep(ids, None)
        # np.isin was most of the loop's own time (py-spy) where a compare does
        ended = next_ids == eos_one if eos_one is not None else np.isin(next_ids, eos)
        if stop_rows:
            ended |= np.isin(active, np.fromiter(stop_rows, dtype=np.int64))
        ends = np.count_nonzero(ended)  # a C call: .any() runs numpy's Python wrapper
        if ends:
            if ends == ended.size:
                return
            keep = np.flatnonzero(~ended)
            step.select(keep)
            active, next_ids, every_row = active[keep], next_ids[keep], False
        last_ids = next_ids


def chosen_logprobs(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """log_softmax(scores)[row, ids[row]] without building the whole log-softmax.

    scores: [rows, vocab] float32 (may hold -inf, never a whole row of it); ids: [rows] int64.
    Returns [rows] float32.
    """
    top = scores.max(axis=1)  # [rows]
    log_total = np.log(np.exp(scores - top[:, None]).sum(axis=1))
    return (scores[np.arange(ids.shape[0]), ids] - top - log_total).astype(np.float32)
