"""Beam search over a DecoderStep, mirroring transformers 4.57 `GenerationMixin._beam_search`.

It cannot stream: a beam's tokens are final only when the search ends.

Each step, per input (all in float32, like transformers):
1. log_softmax of the logits, then the logits rules, then add each beam's running score;
2. keep the best `keep = max(2, 1 + len(eos)) * num_beams` candidates of num_beams * vocab
   (`_get_top_k_continuations`): at most `len(eos)` per beam end in EOS, so at least num_beams go on;
3. a candidate "stops" when its last token is an EOS or it reaches max_length; the best num_beams
   candidates that do not stop are the next running beams (`_get_running_beams_for_next_iteration`);
4. stopped candidates among the first num_beams of step 2 become finished hypotheses, scored
   `sum of log-probs / generated_length ** length_penalty`, where the generated length counts the
   tokens after the decoder start token, the EOS included (`_update_finished_beams`); an input keeps
   its best num_beams finished hypotheses;
5. the search ends when no input can still improve (`_check_early_stop_heuristic`), when every input
   has num_beams finished hypotheses and early_stopping is True, or at max_length
   (`_beam_search_has_unfinished_sequences`).

transformers masks with -1e9 rather than -inf (scores stay finite, and -1e9 + x rounds in float32);
the same constant and the same float32 operations in the same order are used here. Given the same
logits, scores then differ only by the rounding of log_softmax (numpy's and torch's differ by ~1 ulp),
and choices only where two candidates tie within that rounding, or tie exactly (see `_top_k_indices`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from runtime.options import GenerationOptions
from runtime.search import DecoderStep, LogitsRule

# transformers' "never pick this" offset; adding it (not -inf) keeps ordering arithmetic finite.
MASKED = np.float32(-1.0e9)

# The decoder prompt is the start token alone (encoder-decoder models).
PROMPT_LEN = 1

# Block size of the top-k prefilter over num_beams * vocab scores.
_TOP_K_BLOCK = 256


@dataclass(frozen=True)
class BeamResult:
    sequences: np.ndarray  # [batch * num_return_sequences, length] int64, start token first, fill after EOS
    scores: np.ndarray  # [batch * num_return_sequences] float32, transformers' sequences_scores


def beam_search(step: DecoderStep, start_ids: np.ndarray, rules: list[LogitsRule],
                options: GenerationOptions) -> BeamResult:
    """Beam search for each input; returns the best num_return_sequences hypotheses per input, best first.

    step: holds batch * num_beams rows, each input's encoder state repeated num_beams times
        (input-major, like transformers' `_expand_inputs_for_generation`).
    start_ids: [batch] int64, the decoder start token of each input.
    rules: applied in order to the log-probs of every step.

    After EOS a sequence is filled like transformers fills it: with pad_token_id, or with the first
    EOS id when pad_token_id is 0 or unset (its `pad_token_id or eos_token_id[0]`), or -1 without EOS.
    Inputs whose finished hypotheses can no longer change are dropped from the step (`step.select`).
    """
    num_beams = options.num_beams
    batch = start_ids.shape[0]
    max_length = options.total_max_length()
    eos_ids = np.asarray(options.eos_token_ids, dtype=np.int64)
    if eos_ids.size:
        fill = options.pad_token_id or int(eos_ids[0])
    else:
        fill = -1
    keep = max(2, 1 + eos_ids.size) * num_beams
    early_stop_when_full = options.early_stopping is True
    length_penalty = options.length_penalty

    # Finished hypotheses of every input, best first ([batch, num_beams, ...]).
    finished_tokens = np.full((batch, num_beams, max_length), fill, dtype=np.int64)
    finished_tokens[:, :, 0] = start_ids[:, None]
    finished_scores = np.full((batch, num_beams), MASKED, dtype=np.float32)
    is_finished = np.zeros((batch, num_beams), dtype=bool)  # slot holds a real finished hypothesis
    finished_lengths = np.zeros((batch, num_beams), dtype=np.int64)  # generated tokens, start excluded
    improvable = np.ones(batch, dtype=bool)  # transformers' is_early_stop_heuristic_unsatisfied

    # Running beams of the inputs still in the step ([active, num_beams, ...]). Only beam 0 may
    # extend at the first step: the others are copies of it, held back by a -1e9 score.
    active = np.arange(batch)
    running_tokens = finished_tokens.copy()
    running_scores = np.zeros((batch, num_beams), dtype=np.float32)
    running_scores[:, 1:] = MASKED

    cur_len = PROMPT_LEN
    while True:
        n_active = active.size
        rows = n_active * num_beams
        flat_tokens = running_tokens.reshape(rows, max_length)
        log_probs = _log_softmax(step(np.ascontiguousarray(flat_tokens[:, cur_len - 1])))  # [rows, vocab]
        for rule in rules:
            rule(flat_tokens[:, :cur_len], log_probs)
        vocab = log_probs.shape[1]
        log_probs += running_scores.reshape(rows, 1)  # now each continuation's total score
        totals = log_probs.reshape(n_active, num_beams * vocab)

        # 2. the best `keep` continuations per input
        flat_best = _top_k_indices(totals, keep)  # [active, keep]
        cand_scores = np.take_along_axis(totals, flat_best, axis=1)
        cand_beams, cand_ids = np.divmod(flat_best, vocab)
        item = np.arange(n_active)[:, None]
        cand_tokens = running_tokens[item, cand_beams, : cur_len + 1]  # [active, keep, cur_len + 1]
        cand_tokens[:, :, cur_len] = cand_ids
        stops = np.isin(cand_ids, eos_ids) | (cur_len + 1 >= max_length)  # [active, keep]

        # 3. next running beams: the best candidates that did not stop
        live_scores = cand_scores + stops.astype(np.float32) * MASKED
        next_pos = _top_k_indices(live_scores, num_beams)  # [active, num_beams]
        running_scores = np.take_along_axis(live_scores, next_pos, axis=1)
        parent_beams = np.take_along_axis(cand_beams, next_pos, axis=1)
        running_tokens[:, :, : cur_len + 1] = cand_tokens[item, next_pos]

        # 4. new finished hypotheses; masked when the input is full (early_stopping=True) or can no
        # longer improve, and for candidates that did not stop or rank below num_beams
        generated = cur_len + 1 - PROMPT_LEN
        just_finished = stops & (np.arange(keep) < num_beams)
        scores = cand_scores / np.float32(generated**length_penalty)
        full = is_finished[active].all(axis=1, keepdims=True) & early_stop_when_full
        scores += full.astype(np.float32) * MASKED
        scores += (~improvable[active, None]).astype(np.float32) * MASKED
        scores += (~just_finished).astype(np.float32) * MASKED
        merged_scores = np.concatenate((finished_scores[active], scores), axis=1)  # [active, 2 * nb..]
        slots = _top_k_indices(merged_scores, num_beams)  # [active, num_beams]
        if (slots != np.arange(num_beams)).any():
            _merge_finished(active, slots, merged_scores, cand_tokens, just_finished, generated,
                            finished_tokens, finished_scores, is_finished, finished_lengths, fill)

        cur_len += 1
        # 5. can any running beam still beat the worst finished hypothesis?
        if options.early_stopping == "never" and length_penalty > 0.0:
            best_length = max_length - PROMPT_LEN
        else:
            best_length = cur_len - PROMPT_LEN
        best_running = running_scores[:, :1] / np.float32(best_length**length_penalty)
        worst_finished = np.where(is_finished[active], finished_scores[active].min(axis=1, keepdims=True),
                                  MASKED)
        improvable[active] &= (best_running > worst_finished).any(axis=1)
        # At least num_beams candidates per input do not end in EOS, so "every candidate stopped"
        # (transformers' third condition) happens exactly at max_length.
        if (cur_len >= max_length or not improvable.any()
                or (early_stop_when_full and is_finished.all())):
            break

        # An input whose new hypotheses are all masked (full or not improvable) and whose finished
        # scores all beat -1e9 can no longer change: candidates score <= -1e9 there, since
        # log-probs are <= 0. Later steps leave its outputs as they are, so it leaves the step.
        # (Its improvable flag then stays as it was: with early_stopping=True transformers may still
        # clear it, which decides when the loop ends only if another input is left with -1e9
        # filler slots: the degenerate case of `_top_k_indices`.)
        frozen = ~improvable[active] | (is_finished[active].all(axis=1) & early_stop_when_full)
        frozen &= finished_scores[active].min(axis=1) > MASKED
        kept = np.flatnonzero(~frozen)
        if kept.size == 0:
            break
        next_rows = (kept[:, None] * num_beams + parent_beams[kept]).reshape(-1)
        if next_rows.size != rows or (next_rows != np.arange(rows)).any():
            step.select(next_rows)
        if kept.size != n_active:
            active, running_tokens, running_scores = active[kept], running_tokens[kept], running_scores[kept]

    num_return = options.num_return_sequences
    out_len = PROMPT_LEN + int(finished_lengths[:, :num_return].max())
    sequences = finished_tokens[:, :num_return, :out_len].reshape(batch * num_return, out_len)
    return BeamResult(sequences=sequences, scores=finished_scores[:, :num_return].reshape(-1))


def _merge_finished(active: np.ndarray, slots: np.ndarray, merged_scores: np.ndarray,
                    cand_tokens: np.ndarray, just_finished: np.ndarray, generated: int,
                    finished_tokens: np.ndarray, finished_scores: np.ndarray, is_finished: np.ndarray,
                    finished_lengths: np.ndarray, fill: int) -> None:
    """Write the chosen hypotheses of the active inputs into the finished arrays, in place.

    slots: [active, num_beams] int64 indices into [old finished slots..., candidates...];
    cand_tokens: [active, keep, cur_len + 1] int64; just_finished: [active, keep] bool.
    """
    num_beams = slots.shape[1]
    item = np.arange(active.size)[:, None]
    from_old = slots < num_beams
    old_slot = np.where(from_old, slots, 0)
    cand_pos = np.where(from_old, 0, slots - num_beams)
    tokens = finished_tokens[active[:, None], old_slot]  # [active, num_beams, max_length]
    new_tokens = cand_tokens[item, cand_pos]  # [active, num_beams, cur_len + 1]
    prefix = new_tokens.shape[2]
    tokens[:, :, :prefix] = np.where(from_old[:, :, None], tokens[:, :, :prefix], new_tokens)
    tokens[:, :, prefix:] = np.where(from_old[:, :, None], tokens[:, :, prefix:], fill)
    finished_tokens[active] = tokens
    finished_scores[active] = np.take_along_axis(merged_scores, slots, axis=1)
    is_finished[active] = np.where(from_old, is_finished[active[:, None], old_slot],
                                   just_finished[item, cand_pos])
    finished_lengths[active] = np.where(from_old, finished_lengths[active[:, None], old_slot], generated)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """logits: [rows, vocab] float -> [rows, vocab] float32 log-probs (a new array rules may edit)."""
    logits = logits.astype(np.float32, copy=False)
    log_probs = logits - logits.max(axis=1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
    return log_probs


def _top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, largest first: scores [n, m] float32 -> [n, k] int64.

    Like torch.topk(sorted=True), which transformers uses. Equal scores among the chosen k come out
    lowest index first; which of several scores equal to the k-th largest get in is unspecified.
    torch.topk's order of equal scores is unspecified too (its CPU kernel does not keep index
    order), so at an exact tie the two may differ. Exact ties arise between identical
    beams (the first step's copies) and between -1e9/-inf masked candidates, where the pick does
    not reach the returned tokens unless an input ends with fewer than num_beams real hypotheses
    (forced tokens with max_new_tokens=1, a forced BOS that is an EOS), whose other slots are
    -1e9-scored filler in transformers too; between distinct live candidates only by float32
    coincidence.
    """
    candidates = scores
    columns = None  # candidates' column in scores, when candidates is a subset
    width = scores.shape[1]
    if width > k * _TOP_K_BLOCK:
        # Wide rows (num_beams * vocab): the k largest lie in the k blocks with the largest maxima
        # (up to which of several equal maxima is taken), so only those blocks are ranked: one
        # pass over the row instead of a partition of it (~10x faster at 4 x 32k). The last block
        # runs to the end of the row; its columns past the last full block are always ranked.
        full_width = width - width % _TOP_K_BLOCK
        block_max = np.maximum.reduceat(scores, np.arange(0, full_width, _TOP_K_BLOCK), axis=1)
        best_blocks = np.argpartition(block_max, -k, axis=1)[:, -k:]  # [n, k]
        rows = len(scores)
        in_blocks = (best_blocks[:, :, None] * _TOP_K_BLOCK + np.arange(_TOP_K_BLOCK)).reshape(rows, -1)
        tail = np.broadcast_to(np.arange(full_width, width), (rows, width - full_width))
        columns = np.concatenate((in_blocks, tail), axis=1)
        candidates = np.take_along_axis(scores, columns, axis=1)
    best = np.argpartition(candidates, -k, axis=1)[:, -k:]  # [n, k], unordered
    best_scores = np.take_along_axis(candidates, best, axis=1)
    if columns is not None:
        best = np.take_along_axis(columns, best, axis=1)
    order = np.lexsort((best, -best_scores), axis=1)
    return np.take_along_axis(best, order, axis=1)
