"""Generation options: one frozen dataclass, fields named like transformers' `generate` kwargs.

Resolution follows transformers: the exported `generation_config.json` gives the defaults, call
arguments override them, `max_new_tokens` wins over `max_length`, and lengths count decoder tokens
including the decoder start token. Validated once, in `resolve`, never in the decoding loop.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from runtime.errors import InvalidOptionError

# transformers' GenerationConfig default when neither max_length nor max_new_tokens is set anywhere.
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
                pad_token_id: int, decoder_start_token_id: int) -> "GenerationOptions":
        """Merge generation_config defaults with call overrides (None in overrides means "not given").

        Raises:
            InvalidOptionError: an unknown option, or a value outside its range.
        """
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in overrides if k not in names)
        if unknown:
            raise InvalidOptionError(
                f"unknown generation option(s) {unknown}; known: {sorted(names)}"
            )
        values = {k: v for k, v in defaults.items() if k in names and v is not None}
        values.update({k: v for k, v in overrides.items() if v is not None})
        # an explicit max_length (min_length) beats a max_new_tokens (min_new_tokens) default
        if overrides.get("max_length") is not None and overrides.get("max_new_tokens") is None:
            values.pop("max_new_tokens", None)
        if overrides.get("min_length") is not None and overrides.get("min_new_tokens") is None:
            values.pop("min_new_tokens", None)
        if isinstance(values.get("bad_words_ids"), list):
            values["bad_words_ids"] = tuple(tuple(int(t) for t in seq) for seq in values["bad_words_ids"])
        for key in ("eos_token_id", "forced_eos_token_id"):
            if isinstance(values.get(key), list):
                values[key] = tuple(int(t) for t in values[key])
        values.setdefault("eos_token_id", tuple(eos_token_ids))
        values.setdefault("pad_token_id", pad_token_id)
        values.setdefault("decoder_start_token_id", decoder_start_token_id)
        options = cls(**values)
        options.validate()
        return options

    def validate(self) -> None:
        def bad(name: str, why: str) -> None:
            raise InvalidOptionError(f"{name}={getattr(self, name)!r}: {why}")

        if self.num_beams < 1:
            bad("num_beams", "must be >= 1")
        if self.num_return_sequences < 1:
            bad("num_return_sequences", "must be >= 1")
        if not self.do_sample and self.num_return_sequences > self.num_beams:
            bad("num_return_sequences", f"must be <= num_beams ({self.num_beams}) without sampling")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            bad("max_new_tokens", "must be >= 1")
        if self.max_new_tokens is None and self.max_length < 2:
            bad("max_length", "must be >= 2 (the start token plus one generated token)")
        for name in ("min_length", "no_repeat_ngram_size", "top_k"):
            if getattr(self, name) < 0:
                bad(name, "must be >= 0")
        if self.min_new_tokens is not None and self.min_new_tokens < 0:
            bad("min_new_tokens", "must be >= 0")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0 (1.0 disables it)")
        if self.temperature <= 0:
            bad("temperature", "must be > 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.early_stopping not in (True, False, "never"):
            bad("early_stopping", 'must be True, False or "never"')
        if self.bad_words_ids is not None and any(len(seq) == 0 for seq in self.bad_words_ids):
            bad("bad_words_ids", "must not contain an empty sequence")
        if self.do_sample and self.num_beams > 1:
            bad("do_sample", "beam sampling is not supported; use num_beams=1 with do_sample")

    def with_(self, **changes: Any) -> "GenerationOptions":
        return replace(self, **changes)
