"""Decoder-only language models (kind "decoder-only": models/ SimpleDecoderOnly, DecoderOnly).

    model = runtime.load("out/lm")                     # runtime.load picks this class from s2s.json
    model.generate(prompt_ids, attention_mask, max_new_tokens=16, num_beams=4)
    # -> [batch * num_return_sequences, prompt_len + new] int64: the prompt, then the continuation,
    #    what transformers' decoder-only `generate` returns

One graph, `decoder_file`: input_ids [rows, new_len], attention_mask [rows, past_len + new_len] and the
self-attention caches [rows, heads, past_len, head_dim] -> logits [rows, new_len, vocab] and the grown
caches. A call runs the prompt but its last token through it in one run (prompt ingestion), then hands
the search a step object that runs the prompt's last token first: beam search takes the prompts
themselves ([batch, prompt_len]); greedy search and sampling start from the prompt's last token, as an
encoder-decoder's start from the decoder start token. Either way the searches (runtime/search) run
unchanged, and lengths count the tokens after the prompt, as transformers counts them.

Padding: prompts are padded on the left, like transformers' decoder-only `generate`; the graph masks
padded keys and counts positions over real tokens, so a padded row generates what it generates alone.
A prompt whose last token is padding (right padding) is refused.

The caches come back to the host after every run (plain runs, no IO binding for this kind yet): on
CUDA that costs a copy of them per step.

Greedy search and sampling see the prompt's last token only, so the logits rules that read the
prompt (repetition_penalty, no_repeat_ngram_size, bad words of more than one token) are refused with a
clear error rather than computed on part of the sequence, and so is forced_bos_token_id (transformers
applies it at position 1, inside a decoder-only prompt); beam search refuses them too, so that the
options mean one thing for every search. max_length and min_length count the prompt, as in
transformers; they are turned into new-token counts per call.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import ExportDirError, InvalidInputError, InvalidOptionError
from runtime.logits import build_rules, build_warpers
from runtime.manifest import ATTENTION_MASK, INPUT_IDS, LOGITS, Manifest, fed_back
from runtime.model import Generation, id_matrix
from runtime.options import DEFAULT_MAX_LENGTH, GenerationOptions, is_int
from runtime.search import Shared
from runtime.search.beam import beam_search
from runtime.search.greedy import greedy_search
from runtime.search.sampling import sample_search
from runtime.sessions import Graph, ProviderConfig, resolve_provider
from runtime.text import TextCodec


class DecoderOnlyModel:
    """A loaded decoder-only export. Holds only read-only things: one model serves concurrent calls."""

    def __init__(self, export_dir: Path, manifest: Manifest, provider: str = "auto", threads: int | None = None,
                 io_binding: bool | None = None):
        if threads is not None and threads < 1:
            raise InvalidOptionError(f"threads={threads}: must be >= 1 (or None for onnxruntime's default)")
        if io_binding:
            raise InvalidOptionError("io_binding=True: decoder-only models run without IO binding (their caches "
                                     "come back to the host each step); pass None or False")
        if manifest.vocab_size is None or manifest.pad_token_id is None:
            raise ExportDirError(f"{str(export_dir)!r} holds a {manifest.kind} model, not a decoder-only one: "
                                 "load it with runtime.load")
        self.export_dir = export_dir
        self.manifest = manifest
        self.requested_provider = provider
        self.provider, self.provider_reason = resolve_provider(provider)
        self.config = ProviderConfig(self.provider, threads, io_binding=False)
        manifest.check_shared_weights(export_dir)
        self.graph = Graph(export_dir / manifest.decoder_file, self.config)
        self.vocab_size = manifest.vocab_size
        self.pad_token_id = manifest.pad_token_id
        self._check_io()
        self._text: TextCodec | None = None

    def __reduce__(self):  # ship to another process as its directory, rebuilt there
        from runtime.model import load

        return (load, (self.export_dir, self.requested_provider, self.config.threads, None))

    def _check_io(self) -> None:
        """Fail at load, naming the tensor, when the graph does not match the manifest."""
        missing = [n for n in [INPUT_IDS, ATTENTION_MASK] + [s.input_name for s in self.manifest.states]
                   if n not in self.graph.inputs]
        missing += [n for n in [LOGITS, *fed_back(self.manifest.states).values()] if n not in self.graph.outputs]
        if missing:
            raise ExportDirError(f"{self.graph.name} lacks {missing}, which s2s.json names; the directory is "
                                 "inconsistent with its s2s.json, re-export the model")
        self.manifest.check_feedable(self.graph.name, self.graph.inputs, "decoder")
        for state in self.manifest.states:
            spec = self.graph.inputs[state.input_name]
            other_dims = [dim for axis, dim in enumerate(spec.shape) if axis not in (state.batch_axis, state.seq_axis)]
            if state.seq_axis is None or not all(isinstance(dim, int) for dim in other_dims):
                raise ExportDirError(f"state {state.input_name!r} starts empty, so it needs a seq_axis and fixed sizes "
                                     f"on its other axes; its shape is {spec.shape}; re-export the model")

    # -- token ids --------------------------------------------------------------------------------
    def generate(self, prompt_ids: Any, attention_mask: Any = None, **options: Any) -> np.ndarray:
        """Continue prompts like transformers' decoder-only `generate`.

        prompt_ids: [batch, prompt_len] int64, padded on the left; attention_mask: same shape, 1 for real
        tokens (default: 0 at pad tokens if the prompts hold any, as transformers infers it). Options are
        `generate`'s kwargs; defaults come from the exported generation defaults.
        Returns [batch * num_return_sequences, prompt_len + new] int64.

        Raises:
            InvalidInputError: empty, out-of-vocabulary or right-padded prompts.
            InvalidOptionError: a bad option, or one this model kind does not support (see module docstring).
        """
        return self.generate_with_scores(prompt_ids, attention_mask, **options).sequences

    def generate_with_scores(self, prompt_ids: Any, attention_mask: Any = None, **options: Any) -> Generation:
        """`generate`, plus the beam scores (transformers' `sequences_scores`) when num_beams > 1."""
        prompt_ids, attention_mask = self._check_inputs(prompt_ids, attention_mask)
        opts = self.options(prompt_ids.shape[1], **options)
        if opts.num_beams > 1:
            step = PromptDecoder(self, prompt_ids, attention_mask, opts.num_beams)
            full = _counting_the_prompt(opts, prompt_ids.shape[1])
            result = beam_search(step, prompt_ids, build_rules(full, self.vocab_size), full)
            return Generation(result.sequences, result.scores)
        repeat = opts.num_return_sequences  # sampling: several samples per prompt
        steps = list(self._token_stream(prompt_ids, attention_mask, opts, repeat))
        prompts = np.repeat(prompt_ids, repeat, axis=0)
        body = np.stack(steps, axis=1) if steps else np.zeros((prompts.shape[0], 0), dtype=np.int64)
        return Generation(np.concatenate([prompts, body], axis=1), None)

    def stream(self, prompt_ids: Any, attention_mask: Any = None, **options: Any) -> Iterator[np.ndarray]:
        """Yield the next token of every row, [batch] int64, as soon as it is known (pad once a row ended).

        Greedy and sampling only: beam search cannot stream, since a beam's tokens are final only at the end.
        """
        prompt_ids, attention_mask = self._check_inputs(prompt_ids, attention_mask)
        opts = self.options(prompt_ids.shape[1], **options)
        if opts.num_beams > 1:
            raise InvalidOptionError("stream() cannot run beam search (num_beams > 1): use generate()")
        if opts.num_return_sequences > 1:
            raise InvalidOptionError("stream() returns one sequence per prompt: use num_return_sequences=1")
        return self._token_stream(prompt_ids, attention_mask, opts, 1)

    def _token_stream(self, prompt_ids: np.ndarray, attention_mask: np.ndarray, opts: GenerationOptions,
                      repeat: int) -> Iterator[np.ndarray]:
        step = PromptDecoder(self, prompt_ids, attention_mask, repeat)
        start_ids = np.repeat(prompt_ids[:, -1], repeat)
        rules = build_rules(opts, self.vocab_size)
        if opts.do_sample:
            return sample_search(step, start_ids, rules, build_warpers(opts), opts)
        return greedy_search(step, start_ids, rules, opts)

    # -- text ---------------------------------------------------------------------------------------
    def generate_text(self, prompts: Sequence[str] | str, **options: Any) -> list[str]:
        """Tokenize (the tokenizer's own special tokens included), pad on the left, generate, and return
        each continuation as text (the prompt left out): batch * num_return_sequences texts, in order."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            raise InvalidInputError("no prompts given")
        ids, _ = self.text.token_ids(prompts)
        prompt_ids, attention_mask = left_padded(ids, self.pad_token_id)
        sequences = self.generate(prompt_ids, attention_mask, **options)
        return self.text.decode(sequences[:, prompt_ids.shape[1]:])

    @property
    def text(self) -> TextCodec:
        if self._text is None:  # built once; a race only builds it twice, both identical
            self._text = TextCodec(self.export_dir, self.manifest.tokenizer_file, self.pad_token_id)
        return self._text

    # -- options and checks ---------------------------------------------------------------------------
    def options(self, prompt_len: int, **overrides: Any) -> GenerationOptions:
        """Resolve call options over the exported defaults, lengths counted after a prompt of prompt_len.

        Raises:
            InvalidOptionError: a bad option, or a rule that would need the whole prompt.
        """
        m = self.manifest
        overrides = _as_new_tokens(m.generation_defaults, overrides, prompt_len)
        opts = GenerationOptions.resolve(m.generation_defaults, overrides, eos_token_ids=m.eos_token_ids,
                                         pad_token_id=m.pad_token_id, decoder_start_token_id=None)
        unsupported = {"repetition_penalty": opts.repetition_penalty != 1.0,
                       "no_repeat_ngram_size": opts.no_repeat_ngram_size > 0,
                       "bad_words_ids": any(len(words) > 1 for words in opts.bad_words_ids or ()),
                       "forced_bos_token_id": opts.forced_bos_token_id is not None}
        for name, used in unsupported.items():
            if used:
                raise InvalidOptionError(
                    f"{name}={getattr(opts, name)!r}: decoder-only generation does not support it yet (the search "
                    "sees the prompt's last token, not the whole prompt); leave it unset"
                    + (" (bad words of one token work)" if name == "bad_words_ids" else ""))
        return opts

    def _check_inputs(self, prompt_ids: Any, attention_mask: Any) -> tuple[np.ndarray, np.ndarray]:
        ids = id_matrix(prompt_ids, "prompt_ids", "prompt_len", "prompt")
        pad = self.manifest.pad_token_id
        if attention_mask is None:
            # transformers' rule: pad tokens are masked when they occur and are not EOS
            infer = (ids == pad).any() and pad not in self.manifest.eos_token_ids
            mask = (ids != pad).astype(np.int64) if infer else np.ones_like(ids, dtype=np.int64)
        else:
            mask = np.asarray(attention_mask)
            if mask.ndim == 1:
                mask = mask[None, :]
            if mask.shape != ids.shape:
                raise InvalidInputError(f"attention_mask shape {mask.shape} differs from prompt_ids shape {ids.shape}")
            mask = mask.astype(np.int64, copy=False)
        if not (mask[:, -1] == 1).all():
            raise InvalidInputError("a prompt ends in padding: decoder-only prompts are padded on the left (the "
                                    "last column of attention_mask must be 1 in every row)")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise InvalidInputError(f"prompt_ids must lie in [0, {self.vocab_size}) (the vocabulary), found "
                                    f"{ids.min()}..{ids.max()}")
        return ids.astype(np.int64, copy=False), mask


class PromptDecoder:
    """One call's decoder (implements runtime.search.DecoderStep): its caches and attention mask, for
    rows = batch * repeat (input-major), with the prompt but its last token already in the caches."""

    def __init__(self, model: DecoderOnlyModel, prompt_ids: np.ndarray, attention_mask: np.ndarray, repeat: int):
        self._graph = model.graph
        self._states = model.manifest.states
        self._outputs = fed_back(self._states)  # state input -> the output that feeds it back
        batch = prompt_ids.shape[0]
        self._mask = attention_mask[:, :-1]  # [rows, past_len] int64, host
        values = {s.input_name: self._empty(s.input_name, batch) for s in self._states}
        if prompt_ids.shape[1] > 1:  # one run over the prompt's head: its logits are not needed
            results = self._graph.run({INPUT_IDS: prompt_ids[:, :-1], ATTENTION_MASK: self._mask, **values},
                                      self._outputs.values())
            values = {name: results[output] for name, output in self._outputs.items()}
        if repeat > 1:
            rows = np.repeat(np.arange(batch), repeat)
            values = {s.input_name: np.take(values[s.input_name], rows, axis=s.batch_axis) for s in self._states}
            self._mask = self._mask[rows]
        self._values = values

    def _empty(self, name: str, rows: int) -> np.ndarray:
        spec = self._graph.inputs[name]
        state = next(s for s in self._states if s.input_name == name)
        return np.zeros(spec.shape_with(state.sizes(rows, 0)), dtype=spec.dtype)

    def __call__(self, input_ids: np.ndarray) -> np.ndarray:
        """input_ids: [rows] int64 -> next-token logits [rows, vocab] float32; the caches grow one position."""
        self._mask = np.concatenate([self._mask, np.ones((self._mask.shape[0], 1), dtype=np.int64)], axis=1)
        feeds = {INPUT_IDS: input_ids.reshape(-1, 1), ATTENTION_MASK: self._mask, **self._values}
        results = self._graph.run(feeds, [LOGITS, *self._outputs.values()], host_outputs=(LOGITS,))
        self._values = {name: results[output] for name, output in self._outputs.items()}
        return results[LOGITS][:, -1, :].astype(np.float32, copy=False)

    def select(self, rows: np.ndarray, shared: Shared | None = None) -> None:
        """Keep rows `rows` ([new_rows] int64) of the caches and the mask, in that order (whole rows:
        shared is not used)."""
        self._mask = self._mask[rows]
        self._values = {s.input_name: np.take(self._values[s.input_name], rows, axis=s.batch_axis)
                        for s in self._states}


def _counting_the_prompt(opts: GenerationOptions, prompt_len: int) -> GenerationOptions:
    """`opts` (lengths counted from one start token) with lengths counted over the whole prompt, for a
    search that holds the prompt: max / min length prompt_len + the new tokens."""
    min_new = opts.total_min_length() - 1
    return replace(opts, max_new_tokens=None, max_length=prompt_len + opts.total_max_length() - 1,
                   min_new_tokens=None, min_length=prompt_len + min_new if min_new > 0 else 0)


def left_padded(ids: Sequence[Sequence[int]], pad_token_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists -> prompt_ids, attention_mask: [batch, longest] int64, padded on the left."""
    longest = max(len(seq) for seq in ids)
    prompt_ids = np.full((len(ids), longest), pad_token_id, dtype=np.int64)
    attention_mask = np.zeros((len(ids), longest), dtype=np.int64)
    for row, seq in enumerate(ids):
        prompt_ids[row, longest - len(seq):] = seq
        attention_mask[row, longest - len(seq):] = 1
    return prompt_ids, attention_mask


def _as_new_tokens(defaults: dict[str, Any], overrides: dict[str, Any], prompt_len: int) -> dict[str, Any]:
    """The call's overrides with max_length / min_length, which count the prompt in a decoder-only
    `generate`, turned into max_new_tokens / min_new_tokens after a prompt of prompt_len tokens.

    Where a *_new_tokens value is set (in the call or the defaults) it wins, as in transformers; the
    default max_length (20, unset) means 20 new tokens there too, which GenerationOptions already does.

    Raises:
        InvalidOptionError: a max_length that leaves no room for a new token after the prompt.
    """
    given = {k: v for k, v in overrides.items() if v is not None}
    out = dict(given)
    for total, new in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
        if given.get(new) is not None or defaults.get(new) is not None:
            continue
        value = given.get(total, defaults.get(total))
        if not is_int(value) or (total == "max_length" and total not in given and value == DEFAULT_MAX_LENGTH):
            continue  # unset, the default (20 new tokens), or not a number (GenerationOptions says so)
        if total == "max_length" and value <= prompt_len:
            raise InvalidOptionError(f"max_length={value} counts the prompt ({prompt_len} tokens) and leaves no room "
                                     "for a new token; raise it or set max_new_tokens")
        out[new] = max(0, value - prompt_len) if total == "min_length" else value - prompt_len
        out.pop(total, None)
    return out
