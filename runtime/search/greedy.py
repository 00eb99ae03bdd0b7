"""Greedy search: the argmax token each step, until every row has emitted EOS or max length.

`token_steps` is the loop greedy search and sampling share; they differ only in how a row's next
token is chosen from its scores. `greedy_search` yields the ids alone (what `Model.stream` gives);
`greedy_steps` yields `TokenStep`s, with each chosen token's log-probability when asked and rows a
caller ends early (a server's stop sequence, a client that left).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Generator, Iterator
from typing import NamedTuple

import numpy as np

from runtime.logits import shared_bans, shared_bans_by_length
from runtime.options import GenerationOptions
from runtime.search import DecoderStep, LogitsRule, PinnedStep

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
    return token_steps(step, start_ids, rules, options, _argmax, logprobs=logprobs, stop_rows=stop_rows)


def _argmax(scores: np.ndarray, active: np.ndarray) -> np.ndarray:
    # next_tokens = torch.argmax(next_token_scores, dim=-1)
    return scores.argmax(axis=-1)


def token_steps(step: DecoderStep, start_ids: np.ndarray, rules: list[LogitsRule], options: GenerationOptions,
                choose: ChooseToken, *, logprobs: bool = False,
                stop_rows: Collection[int] | None = None) -> Iterator[TokenStep]:
    """The one-token-per-step loop: run the step, apply the rules, choose, yield, drop finished rows.

    A finished row yields pad, like transformers (`next_tokens * unfinished + pad * (1 - unfinished)`).
    Finished rows are dropped from the decoder (`step.select`), so they stop costing graph work.
    Greedy steps take `_pinned_steps` when the step offers it (see there).

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
    pinned_of = getattr(step, "pinned", None) if choose is _argmax and not logprobs else None
    last_ids = start_ids.astype(np.int64)  # [rows]
    cur_len = 1
    while cur_len < max_len:
        pinned = pinned_of() if pinned_of is not None else None
        if pinned is not None and shared_bans(rules, cur_len) is not None:
            into = _Rows(sequences, None if every_row else active, pad)
            cur_len, next_ids = yield from _pinned_steps(pinned, last_ids, rules, cur_len, max_len, into, eos,
                                                         stop_rows)
        else:
            next_ids, tokens = _choose(step, last_ids, rules, choose, sequences, active, every_row, cur_len,
                                       pad, logprobs)
            yield tokens
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
        cur_len += 1


def _choose(step: DecoderStep, last_ids: np.ndarray, rules: list[LogitsRule], choose: ChooseToken,
            sequences: np.ndarray, active: np.ndarray, every_row: bool, cur_len: int, pad: int | None,
            logprobs: bool) -> tuple[np.ndarray, TokenStep]:
    """One step of `token_steps`' general loop: run the step, apply the rules, choose, record in
    `sequences`. Returns the chosen ids of the active rows, [rows] int64, and the step to yield."""
    scores = step(last_ids)  # [rows, vocab] float32
    if rules:
        seen = sequences[:, :cur_len] if every_row else sequences[active, :cur_len]
        for rule in rules:
            rule(seen, scores)
    next_ids = choose(scores, active)  # a new array each step
    batch = sequences.shape[0]
    if every_row:
        sequences[:, cur_len] = next_ids
        ids = next_ids.copy()
    else:
        sequences[active, cur_len] = next_ids
        ids = np.full(batch, pad, dtype=np.int64)
        ids[active] = next_ids
    if not logprobs:
        return next_ids, TokenStep(ids, None)
    chosen = np.zeros(batch, dtype=np.float32)
    chosen[active] = chosen_logprobs(scores, next_ids)
    return next_ids, TokenStep(ids, chosen)


class _Rows(NamedTuple):
    """Where `_pinned_steps` puts the ids of the decoder's rows: `sequences` [batch, max_len], the rows
    being the batch indices `active` (None: every row, in order); a step yields [batch] ids, pad for
    the rows that ended."""

    sequences: np.ndarray
    active: np.ndarray | None
    pad: int | None

    def emit(self, ids: np.ndarray) -> np.ndarray:
        if self.active is None:
            return ids
        every = np.full(self.sequences.shape[0], self.pad, dtype=np.int64)
        every[self.active] = ids
        return every

    def record(self, first: int, steps: np.ndarray) -> None:
        """steps: [n, rows] ids of positions first .. first + n - 1."""
        where = slice(None) if self.active is None else self.active
        self.sequences[where, first:first + steps.shape[0]] = steps.T


def _pinned_steps(pinned: PinnedStep, last_ids: np.ndarray, rules: list[LogitsRule], cur_len: int, max_len: int,
                  into: _Rows, eos: np.ndarray,
                  stop_rows: Collection[int] | None) -> Generator[TokenStep, None, tuple[int, np.ndarray]]:
    """`token_steps`' greedy steps from cur_len on, while the decoder's rows run and `rules` only ban shared ids
    (MinLength): one numpy call a step, the argmax, written where the next step reads its ids.

    Between two decoder runs the interpreter works on caches the graph has just flushed, and there each
    numpy call costs microseconds (measured on the t5-small shape, int8, batch 1: the general loop's
    ~10 calls took ~100 us a step, this one ~35). So the ids go into a time-major record whose rows
    are made once, the bans and the EOS check go through memoryviews, and the step's positions through
    `PinnedStep.run`. Same tokens: the same float32 scores, the same bans, numpy's argmax. Where the
    decoder has a greedy head, the bans go into its bias and the decoder writes the argmax itself
    (`PinnedStep.next_ids`): the logits never leave the graph.

    Yields each step like `token_steps`; returns (cur_len, ids [rows] int64) of the last step it ran,
    after a step where a row emitted EOS, a stop row was asked for, or max_len was reached (the caller
    ends rows from there), or before a step where a rule does more than ban (the caller runs it; the
    caller checked that the first step is not one). `into` records the steps it ran.
    """
    rows = pinned.scores.shape[0]
    record = np.empty((max_len - cur_len, rows), dtype=np.int64)  # [step, row]: each step's ids, contiguous
    outs = list(record)
    views = [out.data for out in outs]
    cells = pinned.scores.data
    argmax, ids, run, head = pinned.scores.argmax, pinned.ids, pinned.run, pinned.next_ids
    eos_one = int(eos[0]) if eos.size == 1 else None
    eos_ids = [int(token) for token in eos]
    bans_at = shared_bans_by_length(rules, max_len)
    banned: tuple[int, ...] = ()  # the ids the head's bias bans (an earlier call of this may have left others)
    if pinned.bias is not None:
        pinned.bias.fill(0.0)
    minus_inf = float("-inf")
    ids[:] = np.ascontiguousarray(last_ids, dtype=np.int64).data
    first = cur_len
    try:
        while True:
            bans = bans_at[cur_len]
            if bans is None:  # a rule acts on this step (ForcedEOS at the last): the caller's loop runs it
                cur_len -= 1
                return cur_len, outs[cur_len - first]
            out, view = outs[cur_len - first], views[cur_len - first]
            if head is not None:  # the decoder chooses: its bias bans, its next ids are the step's
                if bans != banned:
                    banned = _ban(pinned.bias, banned, bans)
                run()
                view[:] = head
            else:
                run()
                for token in bans:
                    for row in range(rows):
                        cells[row, token] = minus_inf  # type: ignore[call-overload]  # typeshed: int items only
                argmax(1, out)  # the one numpy call
            ids[:] = view
            yield TokenStep(into.emit(out), None)
            if cur_len + 1 >= max_len or stop_rows or (eos_one in view if eos_one is not None
                                                       else any(token in view for token in eos_ids)):
                return cur_len, out
            cur_len += 1
    finally:
        into.record(first, record[:cur_len + 1 - first])


def _ban(bias: np.ndarray | None, banned: tuple[int, ...], bans: tuple[int, ...]) -> tuple[int, ...]:
    """A greedy head's bias banning `bans` instead of `banned`; returns bans."""
    assert bias is not None  # a PinnedStep with next_ids has a bias
    bias[list(banned)] = 0.0
    bias[list(bans)] = float("-inf")
    return bans


def chosen_logprobs(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """log_softmax(scores)[row, ids[row]] without building the whole log-softmax.

    scores: [rows, vocab] float32 (may hold -inf, never a whole row of it); ids: [rows] int64.
    Returns [rows] float32.
    """
    top = scores.max(axis=1)  # [rows]
    log_total = np.log(np.exp(scores - top[:, None]).sum(axis=1))
    return (scores[np.arange(ids.shape[0]), ids] - top - log_total).astype(np.float32)
