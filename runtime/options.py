"""Generation options: one frozen dataclass, fields named like transformers' `generate` kwargs.

Resolution follows transformers: the exported `generation_config.json` gives the defaults, call
arguments override them, `max_new_tokens` wins over `max_length`, and lengths count decoder tokens
including the decoder start token. Validated once, in `resolve`, never in the decoding loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, TypeGuard

import numpy as np

from runtime.errors import InvalidOptionError, UnsupportedModelError


def is_int(value: Any) -> TypeGuard[int | np.integer]:
    """An integer (numpy's too), not a bool."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value: Any) -> bool:
    """A finite real number (numpy's too), not a bool."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)) \
        and math.isfinite(value)


# generation_config.json keys that change transformers' output but that s2s does not implement, with the
# value that turns each off (GenerationConfig's default). A checkpoint setting one fails clearly rather
# than generating different tokens. The sampling-only ones matter only with do_sample.
UNSUPPORTED_OPTIONS: dict[str, Any] = {
    "encoder_no_repeat_ngram_size": 0,
    "encoder_repetition_penalty": 1.0,
    "num_beam_groups": 1,
    "diversity_penalty": 0.0,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "renormalize_logits": False,
    "forced_decoder_ids": None,
    "constraints": None,
    "force_words_ids": None,
    "penalty_alpha": None,
    "guidance_scale": None,
    "max_time": None,
    "stop_strings": None,
}
UNSUPPORTED_SAMPLING_OPTIONS: dict[str, Any] = {
    "typical_p": 1.0,
    "min_p": None,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
}

# transformers' GenerationConfig default max_length. Left unset, generate reads it as 20 *new* tokens
# (21 decoder tokens in all); `resolve` does the same.
DEFAULT_MAX_LENGTH = 20

EarlyStopping = bool | str  # True, False or "never"


@dataclass(frozen=True)
class GenerationOptions:
    max_length: int = DEFAULT_MAX_LENGTH  # decoder tokens in total, start token included
    max_new_tokens: int | None = None  # None: use max_length; else wins over it
    min_length: int = 0  # 0: no minimum (start token included, like transformers)
    min_new_tokens: int | None = None  # None: use min_length
    num_beams: int = 1  # 1: greedy (or sampling)
    num_return_sequences: int = 1  # <= num_beams with beam search
    length_penalty: float = 1.0  # beam score = sum logprob / length**length_penalty; 0: no length norm
    early_stopping: EarlyStopping = False  # True | False | "never" (beam search stop rule)
    no_repeat_ngram_size: int = 0  # 0: off
    repetition_penalty: float = 1.0  # 1.0: no penalty
    bad_words_ids: tuple[tuple[int, ...], ...] | None = None  # None: off
    forced_bos_token_id: int | None = None  # None: off; forced as the first generated token
    forced_eos_token_id: int | tuple[int, ...] | None = None  # None: off; forced at max_length - 1
    decoder_start_token_id: int | None = None  # None: from the manifest
    eos_token_id: int | tuple[int, ...] | None = None  # None: from the manifest
    pad_token_id: int | None = None  # None: from the manifest
    do_sample: bool = False  # False: greedy / beam search
    temperature: float = 1.0  # 1.0: unchanged scores (sampling only)
    top_k: int = 50  # 0: off (sampling only)
    top_p: float = 1.0  # 1.0: off (sampling only)
    seed: int | None = None  # sampling RNG seed; None: fresh entropy per call

    # -- derived values the search uses ---------------------------------------------------------
    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        eos = self.eos_token_id
        if eos is None:
            return ()
        return (eos,) if isinstance(eos, int) else tuple(eos)

    def total_max_length(self) -> int:
        """Longest decoder sequence, start token included."""
        return self.max_new_tokens + 1 if self.max_new_tokens is not None else self.max_length

    def total_min_length(self) -> int:
        """Shortest decoder sequence before EOS is allowed, start token included."""
        return self.min_new_tokens + 1 if self.min_new_tokens is not None else self.min_length

    @classmethod
    def resolve(cls, defaults: dict[str, Any], overrides: dict[str, Any], *, eos_token_ids: tuple[int, ...],
                pad_token_id: int | None, decoder_start_token_id: int | None,
                max_position_embeddings: int | None = None) -> GenerationOptions:
        """Merge generation_config defaults with call overrides (None in overrides means "not given").

        Mirrors transformers 4.57 `generate` for an encoder-decoder whose decoder prompt is the start
        token alone: call arguments override generation_config.json, which overrides the dataclass
        defaults; a max_new_tokens (min_new_tokens) set anywhere wins over any max_length
        (min_length), even one given in the call; and with no max_length in the call and none but
        the default 20 in the config, transformers generates 20 *new* tokens, so the total becomes
        21, capped at the model's max_position_embeddings.

        max_position_embeddings: the decoder's position limit (None: none); also the longest total
        length allowed, since a longer run would index past the position table.

        Raises:
            InvalidOptionError: an unknown option, or a value outside its range.
            UnsupportedModelError: generation_config.json turns on an option s2s does not implement.
        """
        _reject_unsupported(defaults)
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in overrides if k not in names)
        if unknown:
            raise InvalidOptionError(
                f"unknown generation option(s) {unknown}; known: {sorted(names)}"
            )
        values = {k: v for k, v in defaults.items() if k in names and v is not None}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if values.get("max_new_tokens") is None and overrides.get("max_length") is None \
                and values.get("max_length", DEFAULT_MAX_LENGTH) == DEFAULT_MAX_LENGTH:
            total = DEFAULT_MAX_LENGTH + 1  # transformers' _prepare_generated_length: 20 new tokens
            if max_position_embeddings is not None:
                total = min(total, max_position_embeddings)
            values["max_length"] = total
        words = values.get("bad_words_ids")
        if isinstance(words, (list, tuple)) and all(isinstance(w, (list, tuple)) for w in words):
            values["bad_words_ids"] = tuple(tuple(w) for w in words)
        for key in ("eos_token_id", "forced_eos_token_id"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        values.setdefault("eos_token_id", tuple(eos_token_ids))
        values.setdefault("pad_token_id", pad_token_id)
        values.setdefault("decoder_start_token_id", decoder_start_token_id)
        options = cls(**values)
        options.validate()
        if max_position_embeddings is not None and options.total_max_length() > max_position_embeddings:
            raise InvalidOptionError(
                f"a total length of {options.total_max_length()} decoder tokens (start token included) exceeds the "
                f"model's {max_position_embeddings} positions; lower max_new_tokens / max_length"
            )
        return options

    def validate(self) -> None:
        """Raise InvalidOptionError naming the first option with a wrong type or a value out of range.

        Sampling options are checked only with do_sample, as transformers ignores them otherwise
        (a generation_config.json may carry sampling values the greedy path never reads).
        """
        def bad(name: str, why: str) -> None:
            raise InvalidOptionError(f"{name}={getattr(self, name)!r}: {why}")

        def is_token_ids(value: Any) -> bool:
            ids = value if isinstance(value, tuple) else (value,)
            return bool(ids) and all(is_int(t) and t >= 0 for t in ids)

        for name, minimum in (("num_beams", 1), ("num_return_sequences", 1), ("max_length", 0), ("min_length", 0),
                              ("no_repeat_ngram_size", 0)):
            if not is_int(getattr(self, name)) or getattr(self, name) < minimum:
                bad(name, f"expected an integer >= {minimum}")
        for name, minimum in (("max_new_tokens", 1), ("min_new_tokens", 0)):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < minimum):
                bad(name, f"expected an integer >= {minimum}, or None")
        if not self.do_sample and self.num_return_sequences > self.num_beams:
            bad("num_return_sequences", f"must be <= num_beams ({self.num_beams}) without sampling")
        if self.max_new_tokens is None and self.max_length < 2:
            bad("max_length", "must be >= 2 (the start token plus one generated token); or set max_new_tokens")
        if not is_number(self.repetition_penalty) or not self.repetition_penalty > 0:
            bad("repetition_penalty", "expected a number > 0 (1.0 disables it)")
        if not is_number(self.length_penalty):
            bad("length_penalty", "expected a finite number (1.0: divide by length, 0: no length normalisation)")
        if self.early_stopping not in (True, False, "never"):
            bad("early_stopping", 'must be True, False or "never"')
        for name in ("eos_token_id", "forced_eos_token_id", "forced_bos_token_id", "pad_token_id",
                     "decoder_start_token_id"):
            if getattr(self, name) is not None and not is_token_ids(getattr(self, name)):
                bad(name, "expected a token id (an integer >= 0)" + (", or a tuple of them" if "eos" in name else ""))
        if self.bad_words_ids is not None and not (
            isinstance(self.bad_words_ids, tuple) and self.bad_words_ids
            and all(isinstance(w, tuple) and is_token_ids(w) for w in self.bad_words_ids)
        ):
            bad("bad_words_ids", "expected a non-empty list of non-empty token-id lists, e.g. [[12], [7, 8]]")
        if not isinstance(self.do_sample, bool):
            bad("do_sample", "expected True or False")
        if self.seed is not None and not is_int(self.seed):
            bad("seed", "expected an integer, or None for a fresh seed")
        if self.do_sample:
            if self.num_beams > 1:
                bad("do_sample", "beam sampling is not supported; use num_beams=1 with do_sample")
            if not is_number(self.temperature) or not self.temperature > 0:
                bad("temperature", "expected a number > 0 (1.0 leaves scores unchanged)")
            if not is_int(self.top_k) or self.top_k < 0:
                bad("top_k", "expected an integer >= 0 (0 turns top-k off)")
            if not is_number(self.top_p) or not 0 <= self.top_p <= 1:
                bad("top_p", "expected a number in [0, 1] (1.0 turns top-p off)")


def _reject_unsupported(defaults: dict[str, Any]) -> None:
    checked = dict(UNSUPPORTED_OPTIONS)
    if defaults.get("do_sample"):
        checked.update(UNSUPPORTED_SAMPLING_OPTIONS)
    for name, off in checked.items():
        value = defaults.get(name, off)
        if value != off and value is not None and value != []:
            raise UnsupportedModelError(
                f"generation_config.json sets {name}={value!r}, which s2s does not implement, so its output "
                f"would differ from transformers; set it to {off!r} in the export directory's "
                "generation_config.json and s2s.json (generation_defaults) to generate without it"
            )
