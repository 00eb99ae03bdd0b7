"""Beam search over a DecoderStep, mirroring transformers 4.57 `GenerationMixin._beam_search`.

It cannot stream: a beam's tokens are final only when the search ends.

Each step, per input, in named parts (all in float32, like transformers):
1. `_score`: log_softmax of the logits, then the logits rules, then add each beam's running score;
   keep the best `keep = max(2, 1 + len(eos)) * num_beams` candidates of num_beams * vocab
   (`_get_top_k_continuations`): at most `len(eos)` per beam end in EOS, so at least num_beams go on.
   Without rules (or with rules that only ban the same ids in every row, like MinLength) the step
   returns only its rows' `keep` best log-probs, plus as many as are banned (computed where the
   logits live): the best `keep` of an input are among the best `keep` of each of its beams, and
   the order of equal scores (beam, then token id) is the same as over the full rows;
2. `_advance`: a candidate "stops" when its last token is an EOS or it reaches max_length; the best
   num_beams candidates that do not stop are the next running beams
   (`_get_running_beams_for_next_iteration`);
3. `_finish`: stopped candidates among the first num_beams of step 1 become finished hypotheses,
   scored `sum of log-probs / generated_length ** length_penalty`, where the generated length counts
   the tokens after the prompt, the EOS included (`_update_finished_beams`); an input keeps its best
   num_beams finished hypotheses (`Finished`);
4. the search ends when no input can still improve (`_can_improve`, transformers'
   `_check_early_stop_heuristic`), when every input has num_beams finished hypotheses and
   early_stopping is True, or at max_length (`_beam_search_has_unfinished_sequences`);
5. `_reorder`: the decoder's rows follow their beams' parents; inputs whose result can no longer
   change leave the step.

transformers masks with -1e9 rather than -inf (scores stay finite, and -1e9 + x rounds in float32);
the same constant and the same float32 operations in the same order are used here. Given the same
logits, scores then differ only by the rounding of log_softmax (numpy's, onnxruntime's and torch's
differ by ~1 ulp), and choices only where two candidates tie within that rounding, or tie exactly
(see `log_probs.top_k_indices`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.logits import shared_bans_by_length
from runtime.options import GenerationOptions
from runtime.search import Candidates, DecoderStep, LogitsRule
from runtime.search.log_probs import ScoringStep, rank_candidates, scoring_step, top_k_indices

# transformers' "never pick this" offset; adding it (not -inf) keeps ordering arithmetic finite.
MASKED = np.float32(-1.0e9)
# In `Running.prefix`: two beams whose tokens are alike so far (no first position at which they differ).
ALIKE = 1 << 62


@dataclass(frozen=True)
class BeamResult:
    sequences: np.ndarray  # [batch * num_return_sequences, length] int64, prompt first, fill after EOS
    scores: np.ndarray  # [batch * num_return_sequences] float32, transformers' sequences_scores


@dataclass(frozen=True)
class _Settings:
    """What one search call needs from its options, derived once."""

    num_beams: int
    keep: int  # candidates kept per input and step
    eos_ids: tuple[int, ...]
    fill: int  # written after a hypothesis' EOS
    max_length: int  # prompt included
    prompt_len: int
    length_penalty: float
    early_stopping: bool | str
    stop_when_full: bool  # early_stopping is True
    first_beams: np.ndarray  # [keep] bool: the first num_beams candidates (those that may become hypotheses)
    beam_ids: list[int]  # range(num_beams), as a list (compared with a list per input)
    bans_at: list[tuple[int, ...] | None]  # logits.shared_bans at each decoder length, computed once

    @classmethod
    def of(cls, options: GenerationOptions, prompt_len: int, rules: list[LogitsRule]) -> _Settings:
        eos_ids = np.asarray(options.eos_token_ids, dtype=np.int64)
        keep = max(2, 1 + eos_ids.size) * options.num_beams
        # transformers' `pad_token_id or eos_token_id[0]`: pad 0 counts as unset; -1 without any EOS
        fill = (options.pad_token_id or int(eos_ids[0])) if eos_ids.size else -1
        return cls(num_beams=options.num_beams, keep=keep,
                   eos_ids=tuple(int(t) for t in eos_ids), fill=fill,
                   max_length=options.total_max_length(), prompt_len=prompt_len,
                   length_penalty=options.length_penalty, early_stopping=options.early_stopping,
                   stop_when_full=options.early_stopping is True,
                   first_beams=np.arange(keep) < options.num_beams,
                   beam_ids=list(range(options.num_beams)),
                   bans_at=shared_bans_by_length(rules, options.total_max_length()))


@dataclass
class Finished:
    """Every input's finished hypotheses, best first; slots without one hold MASKED-scored filler."""

    tokens: np.ndarray  # [batch, num_beams, max_length] int64, fill after each hypothesis
    scores: np.ndarray  # [batch, num_beams] float32, length-normalised
    real: np.ndarray  # [batch, num_beams] bool: the slot holds a finished hypothesis
    lengths: np.ndarray  # [batch, num_beams] int64: generated tokens, the prompt excluded
    any_real: bool = False  # some slot holds a finished hypothesis (until then the checks of part 4 are short)

    @classmethod
    def empty(cls, prompt: np.ndarray, s: _Settings) -> Finished:
        """prompt: [batch, prompt_len] int64."""
        batch = prompt.shape[0]
        tokens = np.full((batch, s.num_beams, s.max_length), s.fill, dtype=np.int64)
        tokens[:, :, : s.prompt_len] = prompt[:, None, :]
        return cls(tokens, np.full((batch, s.num_beams), MASKED, dtype=np.float32),
                   np.zeros((batch, s.num_beams), dtype=bool), np.zeros((batch, s.num_beams), dtype=np.int64))

    def add(self, active: np.ndarray, scores: np.ndarray, tokens: np.ndarray, is_new: np.ndarray,
            generated: int, fill: int) -> None:
        """Merge candidates into the hypotheses of inputs `active` ([n] int64), keeping the best num_beams.

        scores: [n, keep] float32, MASKED-offset where a candidate is not a new hypothesis;
        tokens: [n, keep, cur_len + 1] int64; is_new: [n, keep] bool.
        """
        num_beams = self.scores.shape[1]
        merged = np.concatenate((self.scores[active], scores), axis=1)  # [n, num_beams + keep]
        slots = top_k_indices(merged, num_beams)  # [n, num_beams]
        if not (slots != np.arange(num_beams)).any():
            return  # every input keeps what it had
        item = np.arange(active.size)[:, None]
        from_old = slots < num_beams
        old_slot = np.where(from_old, slots, 0)
        cand_pos = np.where(from_old, 0, slots - num_beams)
        kept = self.tokens[active[:, None], old_slot]  # [n, num_beams, max_length]
        new = tokens[item, cand_pos]  # [n, num_beams, cur_len + 1]
        prefix = new.shape[2]
        kept[:, :, :prefix] = np.where(from_old[:, :, None], kept[:, :, :prefix], new)
        kept[:, :, prefix:] = np.where(from_old[:, :, None], kept[:, :, prefix:], fill)
        self.tokens[active] = kept
        self.scores[active] = np.take_along_axis(merged, slots, axis=1)
        self.real[active] = np.where(from_old, self.real[active[:, None], old_slot], is_new[item, cand_pos])
        self.lengths[active] = np.where(from_old, self.lengths[active[:, None], old_slot], generated)
        self.any_real = bool(self.real.any())


@dataclass
class Running:
    """The running beams of the inputs still in the step."""

    active: np.ndarray  # [n] int64: their input indices
    tokens: np.ndarray  # [n, num_beams, max_length] int64
    scores: np.ndarray  # [n, num_beams] float32: sum of log-probs so far (may be a view of the last
    # step's candidates, which the next step writes over: the step reads it before it runs)
    # Per input, beams x beams: the first position at which two beams' tokens differ, ALIKE where they
    # do not (a beam and itself; the first step's copies). Kept step by step from the parents and the
    # new tokens (`_next_prefix`), Python lists: what the decoder's reorder reads (DecoderStep.select's
    # shared), with no numpy call over the histories between two decoder runs.
    prefix: list[list[list[int]]]
    alike: bool = True  # two distinct beams of some input are ALIKE (only then a step without a parent
    # change moves a prefix)
    _item: np.ndarray | None = None
    _offsets: np.ndarray | None = None

    def item(self) -> np.ndarray:
        """[n, 1] int64 arange: the first index of a gather of one column per input."""
        if self._item is None or self._item.shape[0] != self.active.size:
            self._item = np.arange(self.active.size)[:, None]
        return self._item

    def offsets(self) -> np.ndarray:
        """[n, 1] int64: each input's first decoder row."""
        if self._offsets is None or self._offsets.shape[0] != self.active.size:
            self._offsets = np.arange(0, self.active.size * self.tokens.shape[1], self.tokens.shape[1])[:, None]
        return self._offsets


def _candidate_tokens(running: Running, candidates: Candidates, cur_len: int) -> np.ndarray:
    """[n, keep, cur_len + 1] int64: each candidate's beam's tokens and its new one (only where one stops:
    building them every step was numpy calls between two decoder runs)."""
    tokens = running.tokens[running.item(), candidates.beams, : cur_len + 1]  # a copy
    tokens[:, :, cur_len] = candidates.token_ids
    return tokens


def beam_search(step: DecoderStep, start_ids: np.ndarray, rules: list[LogitsRule],
                options: GenerationOptions) -> BeamResult:
    """Beam search for each input; returns the best num_return_sequences hypotheses per input, best first.

    step: holds batch * num_beams rows, each input's encoder state repeated num_beams times
        (input-major, like transformers' `_expand_inputs_for_generation`); it runs the prompt's last
        token first.
    start_ids: [batch] int64, the decoder start token of each input, or [batch, prompt_len] int64
        prompts (decoder-only models); the returned sequences begin with them.
    rules: applied in order to the log-probs of every step.

    After EOS a sequence is filled like transformers fills it: with pad_token_id, or with the first
    EOS id when pad_token_id is 0 or unset (its `pad_token_id or eos_token_id[0]`), or -1 without EOS.
    Inputs whose finished hypotheses can no longer change are dropped from the step (`step.select`).
    """
    prompt = start_ids[:, None] if start_ids.ndim == 1 else start_ids
    s = _Settings.of(options, prompt.shape[1], rules)
    scorer = scoring_step(step)
    finished = Finished.empty(prompt, s)
    improvable = np.ones(prompt.shape[0], dtype=bool)  # transformers' is_early_stop_heuristic_unsatisfied
    # Only beam 0 may extend at the first step: the others are copies of it, held back by a -1e9 score.
    scores = np.zeros((prompt.shape[0], s.num_beams), dtype=np.float32)
    scores[:, 1:] = MASKED
    alike = [[[ALIKE] * s.num_beams for _ in range(s.num_beams)] for _ in range(prompt.shape[0])]
    running = Running(np.arange(prompt.shape[0]), finished.tokens.copy(), scores, alike)
    cur_len = s.prompt_len
    while True:
        candidates = _score(scorer, running, rules, cur_len, s)
        tokens = _candidate_tokens(running, candidates, cur_len) if candidates.stopping else None
        parents, shared = _advance(running, candidates, cur_len, s)
        if tokens is not None:
            _finish(finished, running.active, candidates, tokens, improvable, cur_len, s)
        cur_len += 1
        if finished.any_real or not _surely_improvable(running, cur_len, s):
            improvable[running.active] &= _can_improve(running, finished, cur_len, s)
            # np.count_nonzero: a C call, where .any() runs numpy's Python wrapper (this loop's own time counts)
            if not np.count_nonzero(improvable):
                break
        # At least num_beams candidates per input do not end in EOS, so "every candidate stopped"
        # (transformers' third condition) happens exactly at max_length.
        if cur_len >= s.max_length or (s.stop_when_full and finished.real.all()):
            break
        open_inputs = _still_open(running.active, finished, improvable, s)
        if open_inputs is not None and open_inputs.size == 0:
            break
        _reorder(scorer, running, open_inputs, parents, shared, s)

    num_return = options.num_return_sequences
    out_len = s.prompt_len + int(finished.lengths[:, :num_return].max())
    sequences = finished.tokens[:, :num_return, :out_len].reshape(-1, out_len)
    return BeamResult(sequences=sequences, scores=finished.scores[:, :num_return].reshape(-1))


def _score(step: ScoringStep, running: Running, rules: list[LogitsRule], cur_len: int,
           s: _Settings) -> Candidates:
    """Run the decoder on every running beam and rank the continuations (part 1)."""
    n = running.active.size
    rows = n * s.num_beams
    last_ids = running.tokens[:, :, cur_len - 1].reshape(rows)  # a contiguous copy
    bans = s.bans_at[cur_len]
    if bans is None:
        log_probs = step.log_probs(last_ids)  # [rows, vocab]
        flat_tokens = running.tokens.reshape(rows, s.max_length)
        for rule in rules:
            rule(flat_tokens[:, :cur_len], log_probs)
        candidates = rank_candidates(log_probs, None, running.scores, (), s.keep, s.eos_ids)
    else:  # no rules, or rules that only ban the same ids in every row (MinLength): ranked where the
        # logits live, from each row's keep + len(bans) best (each row keeps `keep` unbanned ones)
        candidates = step.beam_candidates(last_ids, running.scores, bans, s.keep, s.eos_ids)
    if cur_len + 1 >= s.max_length:  # every candidate stops
        return candidates._replace(stops=np.ones(candidates.stops.shape, dtype=bool), stopping=candidates.stops.size)
    return candidates


def _advance(running: Running, candidates: Candidates, cur_len: int,
             s: _Settings) -> tuple[np.ndarray, list[list[list[int]]] | None]:
    """The best num_beams candidates that do not stop become the running beams (part 2).

    Returns each new beam's parent beam, [n, num_beams] int64, and where each two of the old beams of an
    input first differ (`Running.prefix`, what their decoder rows hold alike before it), or None when
    every beam is its own parent (nothing for the decoder to move).
    """
    item = running.item()
    if candidates.stopping:  # + MASKED where a candidate stops (adding 0.0 elsewhere changes nothing)
        live_scores = candidates.scores + candidates.stops.astype(np.float32) * MASKED
        chosen = top_k_indices(live_scores, s.num_beams)  # [n, num_beams]
        parents, scores, token_ids = candidates.beams[item, chosen], live_scores[item, chosen], \
            candidates.token_ids[item, chosen]
    else:  # the candidates come best first: the first num_beams go on (top_k_indices' order of equal scores)
        parents, scores = candidates.beams[:, : s.num_beams], candidates.scores[:, : s.num_beams]
        token_ids = candidates.token_ids[:, : s.num_beams]
    running.scores = scores
    parent_lists = parents.tolist()
    moved = any(row != s.beam_ids for row in parent_lists)  # some beam not its own parent (a list compare)
    shared = running.prefix if moved else None
    if moved or running.alike:
        running.prefix, running.alike = _next_prefix(running.prefix, parent_lists, token_ids.tolist(), cur_len)
    if moved:
        running.tokens = running.tokens[item, parents]  # a copy
    running.tokens[:, :, cur_len] = token_ids
    return parents, shared


def _next_prefix(prefix: list[list[list[int]]], parents: list[list[int]], token_ids: list[list[int]],
                 cur_len: int) -> tuple[list[list[list[int]]], bool]:
    """`Running.prefix` of the new beams, from the old beams' and this step's parents and tokens (written
    at position cur_len): two new beams first differ where their parents do, or at cur_len when their
    parents are alike (the same beam, or alike so far) and their tokens are not. Also returns whether two
    distinct new beams are alike."""
    new, alike = [], False
    for old, beam_parents, tokens in zip(prefix, parents, token_ids):
        pairs = list(zip(beam_parents, tokens))
        rows = []
        for a, (pa, ta) in enumerate(pairs):
            of_parent, row = old[pa], []
            for b, (pb, tb) in enumerate(pairs):
                first = of_parent[pb]
                if first == ALIKE:
                    if ta != tb:
                        first = cur_len
                    elif a != b:
                        alike = True
                row.append(first)
            rows.append(row)
        new.append(rows)
    return new, alike


def _finish(finished: Finished, active: np.ndarray, candidates: Candidates, tokens: np.ndarray,
            improvable: np.ndarray, cur_len: int, s: _Settings) -> None:
    """Stopped candidates among the first num_beams become finished hypotheses (part 3); masked when
    their input is full (early_stopping=True) or can no longer improve. tokens: `_candidate_tokens`."""
    is_new = candidates.stops & s.first_beams
    if not np.count_nonzero(is_new):  # every candidate would be masked: none can displace a slot (see Finished.add)
        return
    generated = cur_len + 1 - s.prompt_len
    scores = candidates.scores / np.float32(generated**s.length_penalty)
    full = finished.real[active].all(axis=1, keepdims=True) & s.stop_when_full
    scores += full.astype(np.float32) * MASKED
    scores += (~improvable[active, None]).astype(np.float32) * MASKED
    scores += (~is_new).astype(np.float32) * MASKED
    finished.add(active, scores, tokens, is_new, generated, s.fill)


def _best_length(cur_len: int, s: _Settings) -> int:
    """The generated length `_can_improve` divides the best running score by."""
    if s.early_stopping == "never" and s.length_penalty > 0.0:
        return s.max_length - s.prompt_len
    return cur_len - s.prompt_len


def _surely_improvable(running: Running, cur_len: int, s: _Settings) -> bool:
    """True when `_can_improve` is True for every active input before any hypothesis finished: each best
    running score, length-normalised, lies far above MASKED (by a factor no float32 rounding reaches).
    One numpy call (the list; numpy's min runs its Python wrapper) where `_can_improve` and its bookkeeping
    make eight. False means: compute it."""
    divisor = float(_best_length(cur_len, s)) ** s.length_penalty
    if not 0.0 < divisor < float("inf"):
        return False
    return min(running.scores[:, 0].tolist()) / divisor > float(MASKED) / 2


def _can_improve(running: Running, finished: Finished, cur_len: int, s: _Settings) -> np.ndarray:
    """Whether each active input's best running beam can still beat its worst finished hypothesis,
    [n] bool (part 4). cur_len: the length after this step's token."""
    best_running = running.scores[:, :1] / np.float32(_best_length(cur_len, s) ** s.length_penalty)
    if not finished.any_real:  # every worst finished score is the MASKED filler
        return best_running[:, 0] > MASKED
    active = running.active
    worst_finished = np.where(finished.real[active], finished.scores[active].min(axis=1, keepdims=True), MASKED)
    return (best_running > worst_finished).any(axis=1)


def _still_open(active: np.ndarray, finished: Finished, improvable: np.ndarray, s: _Settings) -> np.ndarray | None:
    """Positions in `active` of the inputs whose result can still change; None for all of them (always
    so before a hypothesis finished: a frozen input has no MASKED filler left).

    An input whose new hypotheses are all masked (full or not improvable) and whose finished
    scores all beat -1e9 can no longer change: candidates score <= -1e9 there, since log-probs
    are <= 0. Later steps leave its outputs as they are, so it leaves the step. (Its improvable
    flag then stays as it was: with early_stopping=True transformers may still clear it, which
    decides when the loop ends only if another input is left with -1e9 filler slots: the
    degenerate case of `top_k_indices`.)
    """
    if not finished.any_real:
        return None
    frozen = ~improvable[active] | (finished.real[active].all(axis=1) & s.stop_when_full)
    frozen &= finished.scores[active].min(axis=1) > MASKED
    return np.flatnonzero(~frozen)


def _reorder(step: DecoderStep, running: Running, open_inputs: np.ndarray | None, parents: np.ndarray,
             shared: list[list[list[int]]] | None, s: _Settings) -> None:
    """Point the decoder's rows at the new beams' parents and drop the inputs that are done (part 5).

    open_inputs: positions in running.active to keep (None: all); parents: [n, num_beams] int64; shared:
    the old beams' `Running.prefix`, None when every beam is its own parent (see `_advance`). Beams of one
    input mostly share their prefix, so a decoder that copies only the positions after it moves a few
    positions per step instead of whole rows.
    """
    rows = running.active.size * s.num_beams
    if open_inputs is None:
        if shared is not None:
            step.select((parents + running.offsets()).reshape(-1), shared)
        return
    next_rows = (open_inputs[:, None] * s.num_beams + parents[open_inputs]).reshape(-1)
    if next_rows.size != rows:
        step.select(next_rows)
    elif shared is not None:
        step.select(next_rows, shared)
    if open_inputs.size != running.active.size:
        running.active = running.active[open_inputs]
        running.tokens = running.tokens[open_inputs]
        running.scores = running.scores[open_inputs]
        running.prefix = [running.prefix[i] for i in open_inputs.tolist()]
