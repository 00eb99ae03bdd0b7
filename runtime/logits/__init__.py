"""Logits rules: one small callable per rule, composed in transformers' order.

Every rule edits `scores` in place: `rule(sequences, scores)` with sequences [rows, cur_len] int64
(decoder start token included) and scores [rows, vocab] float32. A search calls
`rules = build_rules(options, vocab_size)` once per generate call and then
`for rule in rules: rule(sequences, scores)` every step (sampling adds `build_warpers(options)`).

Greedy search and sampling apply the rules to the raw logits, beam search to log_softmax(logits),
exactly as transformers does: the masking rules (-inf, forced tokens) mean the same on both, and
RepetitionPenalty multiplies log-probabilities (all <= 0) there, as transformers does too.

A new rule is a new module here plus one line in `build_rules`.
"""

from __future__ import annotations

from runtime.errors import InvalidOptionError
from runtime.logits.bad_words import BadWords
from runtime.logits.forced_tokens import ForcedBOS, ForcedEOS
from runtime.logits.min_length import MinLength
from runtime.logits.no_repeat_ngram import NoRepeatNgram
from runtime.logits.repetition_penalty import RepetitionPenalty
from runtime.logits.temperature import Temperature
from runtime.logits.top_k import TopK
from runtime.logits.top_p import TopP
from runtime.options import GenerationOptions
from runtime.search import LogitsRule

__all__ = ["build_rules", "build_warpers", "shared_bans", "shared_bans_by_length", "BadWords", "ForcedBOS",
           "ForcedEOS", "MinLength", "NoRepeatNgram", "RepetitionPenalty", "Temperature", "TopK", "TopP"]


def build_rules(options: GenerationOptions, vocab_size: int) -> list[LogitsRule]:
    """The active rules for `options`, in the order of transformers' `GenerationMixin._get_logits_processor` (4.57):

    repetition_penalty, no_repeat_ngram_size, bad_words_ids, min_length, min_new_tokens,
    forced_bos_token_id, forced_eos_token_id. (min_length and min_new_tokens are one MinLength rule
    here: see its docstring.) Each rule is active under transformers' condition.

    Raises:
        InvalidOptionError: a rule argument out of range, or a token id outside the vocabulary.
    """
    _check_token_ids(options, vocab_size)
    eos = options.eos_token_ids
    rules: list[LogitsRule] = []
    if options.repetition_penalty != 1.0:
        rules.append(RepetitionPenalty(options.repetition_penalty))
    if options.no_repeat_ngram_size > 0:
        rules.append(NoRepeatNgram(options.no_repeat_ngram_size))
    if options.bad_words_ids is not None:
        rules.append(BadWords(options.bad_words_ids, eos))
    if eos and options.total_min_length() > 0:
        rules.append(MinLength(options.total_min_length(), eos))
    if options.forced_bos_token_id is not None:
        rules.append(ForcedBOS(options.forced_bos_token_id))
    if options.forced_eos_token_id is not None:
        rules.append(ForcedEOS(options.total_max_length(), options.forced_eos_token_id))
    return rules


def shared_bans(rules: list[LogitsRule], cur_len: int) -> tuple[int, ...] | None:
    """The token ids `rules` set to -inf in every row at decoder length `cur_len`, when that is all they
    do there (MinLength; ForcedBOS and ForcedEOS at the lengths where they do nothing), else None.

    With such rules a search need not see every score: beam search ranks each row's best
    `keep + len(bans)` log-probs where the logits live, drops the banned ids, and still holds each row's
    best `keep` of the rest (runtime/search/beam.py); greedy search runs its pinned steps
    (runtime/search/greedy.py).
    """
    banned: list[int] = []
    for rule in rules:
        acts = getattr(rule, "acts", None)  # rules that edit the scores at some lengths only
        if acts is not None and not acts(cur_len):
            continue
        bans = getattr(rule, "banned", None)  # only rules that ban shared ids and nothing else have it
        if bans is None:
            return None
        banned.extend(bans(cur_len))
    return tuple(dict.fromkeys(banned))


def shared_bans_by_length(rules: list[LogitsRule], max_length: int) -> list[tuple[int, ...] | None]:
    """`shared_bans(rules, length)` for every decoder length below max_length, computed once per call so
    that a search's steps only index it (each is a few Python calls per rule)."""
    return [shared_bans(rules, length) for length in range(max_length)]


def build_warpers(options: GenerationOptions) -> list[LogitsRule]:
    """The sampling warpers, applied after `build_rules`' rules, in transformers' order:
    temperature, top_k, top_p. Empty unless do_sample.

    They keep at least one token per row: transformers' min_tokens_to_keep=1, its value without
    beam sampling (which this runtime does not offer).
    """
    if not options.do_sample:
        return []
    warpers: list[LogitsRule] = []
    if options.temperature != 1.0:
        warpers.append(Temperature(options.temperature))
    if options.top_k != 0:
        warpers.append(TopK(options.top_k))
    if options.top_p < 1.0:
        warpers.append(TopP(options.top_p))
    return warpers


def _check_token_ids(options: GenerationOptions, vocab_size: int) -> None:
    """Rules index scores by token id: an id outside the vocabulary is the user's error, not an IndexError."""
    named = [("eos_token_id", options.eos_token_ids), ("decoder_start_token_id", (options.decoder_start_token_id,)),
             ("pad_token_id", (options.pad_token_id,))]
    if options.forced_bos_token_id is not None:
        named.append(("forced_bos_token_id", (options.forced_bos_token_id,)))
    if options.forced_eos_token_id is not None:
        forced_eos = options.forced_eos_token_id
        named.append(("forced_eos_token_id", (forced_eos,) if isinstance(forced_eos, int) else forced_eos))
    for word in options.bad_words_ids or ():
        named.append(("bad_words_ids", word))
    for name, ids in named:
        outside = [t for t in ids if isinstance(t, int) and not 0 <= t < vocab_size]
        if outside:
            raise InvalidOptionError(
                f"{name} has token id(s) {outside}, but the model's vocabulary has {vocab_size} tokens "
                f"(ids 0..{vocab_size - 1}); pass ids from this model's tokenizer"
            )
