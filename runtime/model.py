"""The public API: `load` an export directory, then `generate`, `stream` or `generate_text`.

A `Model` holds only read-only things (sessions, manifest, tokenizer); every call builds its own
decoder state, so one model serves concurrent calls from many threads. It is cheap to rebuild from its
directory in another process: `load(path, provider, threads)` is all it takes.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, Union

import numpy as np

from runtime.batching import DEFAULT_BATCH_SIZE, DEFAULT_MAX_BATCH_TOKENS, DEFAULT_WINDOW, BatchLimits
from runtime.decoder import CachedDecoder, EncoderDecoderGraphs
from runtime.errors import ExportDirError, InvalidInputError, InvalidOptionError
from runtime.logits import build_rules, build_warpers
from runtime.manifest import DECODER_ONLY, ENCODER_DECODER, MANIFEST_NAME, REGRESSOR, Manifest
from runtime.options import GenerationOptions
from runtime.search.beam import beam_search
from runtime.search.greedy import TokenStep, greedy_search, greedy_steps
from runtime.search.sampling import sample_search, sample_steps
from runtime.search.scoring import score_tokens
from runtime.sessions import ProviderConfig, resolve_provider
from runtime.text import TextCodec
from runtime.text_iter import TextGeneration, generate_text_stream

if TYPE_CHECKING:
    from runtime.decoder_only import DecoderOnlyModel
    from runtime.regressor import RegressorModel

T = TypeVar("T")

# What `load` returns: the class of the manifest's kind (encoder-decoder, decoder-only, regressor).
LoadedModel = Union["Model", "DecoderOnlyModel", "RegressorModel"]


@dataclass(frozen=True)
class Generation:
    """sequences: [batch * num_return_sequences, length] int64, decoder start token first, pad after EOS.
    scores: [batch * num_return_sequences] float32 beam scores (transformers' `sequences_scores`),
    or None for greedy and sampling."""

    sequences: np.ndarray
    scores: np.ndarray | None


def load(path: str | Path, provider: str = "auto", threads: int | None = None,
         io_binding: bool | None = None) -> LoadedModel:
    """Load an export directory (written by s2s-export, or by `optimum-cli export onnx`).

    provider: "auto" (CUDA when it works, else CPU), "cpu" or "cuda" (fails if CUDA cannot run).
    threads: intra-op threads per session; None lets onnxruntime use every core.
    io_binding: keep decoder state in onnxruntime's memory between steps (IO binding); None: on, for
        every provider; False: plain numpy runs. (Decoder-only models and regressors always run plain.)

    Returns a `Model` for an encoder-decoder; for the manifest's other kinds, a
    `runtime.decoder_only.DecoderOnlyModel` (generate from a prompt) or a
    `runtime.regressor.RegressorModel` (float features: forward and rollout).

    Raises:
        ExportDirError, ManifestVersionError: the directory is not a usable export.
        ProviderUnavailableError: provider="cuda" where CUDA cannot run.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    if manifest.kind == DECODER_ONLY:
        from runtime.decoder_only import DecoderOnlyModel

        return DecoderOnlyModel(path, manifest, provider=provider, threads=threads, io_binding=io_binding)
    if manifest.kind == REGRESSOR:
        from runtime.regressor import RegressorModel

        return RegressorModel(path, manifest, provider=provider, threads=threads, io_binding=io_binding)
    return Model(path, provider=provider, threads=threads, io_binding=io_binding)


class Model:
    def __init__(self, export_dir: str | Path, provider: str = "auto", threads: int | None = None,
                 io_binding: bool | None = None):
        """An encoder-decoder export (`load` takes every kind).

        Raises:
            ExportDirError, ManifestVersionError: the directory is not a usable encoder-decoder export.
            ProviderUnavailableError: provider="cuda" where CUDA cannot run.
        """
        if threads is not None and threads < 1:
            raise InvalidOptionError(f"threads={threads}: must be >= 1 (or None for onnxruntime's default)")
        self.export_dir = Path(export_dir)
        self.requested_provider = provider
        self.manifest = _read_manifest(self.export_dir)
        pad_token_id = self.manifest.pad_token_id
        if self.manifest.kind != ENCODER_DECODER or pad_token_id is None:
            raise ExportDirError(f"{str(export_dir)!r} holds a {self.manifest.kind} model, not an encoder-decoder: "
                                 "load it with runtime.load")
        self._pad_token_id = pad_token_id
        self.provider, self.provider_reason = resolve_provider(provider)
        self.config = ProviderConfig(self.provider, threads, io_binding)
        self.graphs = EncoderDecoderGraphs(self.export_dir, self.manifest, self.config)
        self._text: TextCodec | None = None

    def __reduce__(self):  # ship to another process (e.g. a Ray worker) as its directory, rebuilt there
        # the requested provider, not the resolved one: "auto" on a GPU host must still work on a CPU worker
        return (Model, (self.export_dir, self.requested_provider, self.config.threads, self.config.io_binding))

    # -- token ids --------------------------------------------------------------------------------
    def generate(self, input_ids: Any, attention_mask: Any = None, **options: Any) -> np.ndarray:
        """Generate like transformers' `generate`.

        input_ids: [batch, src_len] int64 (padded on the right); attention_mask: same shape, 1 for real
        tokens (default: all ones). Options are `generate`'s kwargs (num_beams, max_new_tokens, ...);
        defaults come from the exported generation_config.json.
        Returns [batch * num_return_sequences, length] int64, starting with the decoder start token.
        """
        return self.generate_with_scores(input_ids, attention_mask, **options).sequences

    def generate_with_scores(self, input_ids: Any, attention_mask: Any = None, **options: Any) -> Generation:
        """`generate`, plus the beam scores (transformers' `sequences_scores`) when num_beams > 1."""
        opts = self.options(**options)
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask, opts)
        if opts.num_beams > 1:
            step, start_ids = self._start(input_ids, attention_mask, opts, opts.num_beams)
            # beam_search takes one start id per input; the step holds num_beams rows per input
            per_input = start_ids[::opts.num_beams]
            try:
                result = beam_search(step, per_input, build_rules(opts, self.graphs.vocab_size), opts)
            finally:
                step.release()
            return Generation(result.sequences, result.scores)
        repeat = opts.num_return_sequences  # sampling: several samples per input
        steps = list(self._token_stream(input_ids, attention_mask, opts, repeat))
        batch = input_ids.shape[0] * repeat
        start = np.full((batch, 1), opts.decoder_start_token_id, dtype=np.int64)
        body = np.stack(steps, axis=1) if steps else np.zeros((batch, 0), dtype=np.int64)
        return Generation(np.concatenate([start, body], axis=1), None)

    def stream(self, input_ids: Any, attention_mask: Any = None, **options: Any) -> Iterator[np.ndarray]:
        """Yield the next token of every row, [batch] int64, as soon as it is known (pad once a row ended).

        Greedy and sampling only: beam search cannot stream, since a beam's tokens are final only at the end.
        """
        opts = self.options(**options)
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask, opts)
        if opts.num_beams > 1:
            raise InvalidOptionError("stream() cannot run beam search (num_beams > 1): use generate()")
        if opts.num_return_sequences > 1:
            raise InvalidOptionError("stream() returns one sequence per input: use num_return_sequences=1")
        return self._token_stream(input_ids, attention_mask, opts, 1)

    def stream_steps(self, input_ids: Any, attention_mask: Any = None, *, logprobs: bool = False,
                     stop_rows: Collection[int] | None = None, row_seeds: Sequence[int] | None = None,
                     **options: Any) -> Iterator[TokenStep]:
        """`stream` for a server batching unrelated requests: yields a `TokenStep` per step
        (`.ids` [batch] int64, pad once a row ended; `.logprobs` [batch] float32 with logprobs=True).

        stop_rows: batch indices the caller adds to between steps; such a row ends before the next
        step, as if it had emitted EOS (a stop sequence matched, its client left).
        row_seeds: with do_sample, one seed per input row: each row draws what `generate` of its
        input alone with that seed draws (options' seed is then unused).
        Greedy and sampling only, one sequence per input.

        Raises:
            InvalidOptionError: beam search, num_return_sequences > 1, or row_seeds without do_sample
                or of the wrong length; and what `generate` raises for options.
            InvalidInputError: as `generate`.
        """
        opts = self.options(**options)
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask, opts)
        if opts.num_beams > 1 or opts.num_return_sequences > 1:
            raise InvalidOptionError("stream_steps() runs greedy search or sampling with one sequence per input "
                                     f"(got num_beams={opts.num_beams}, "
                                     f"num_return_sequences={opts.num_return_sequences})")
        if row_seeds is not None and not opts.do_sample:
            raise InvalidOptionError("row_seeds apply to sampling only: pass do_sample=True or no row_seeds")
        step, start_ids = self._start(input_ids, attention_mask, opts, 1)
        rules = build_rules(opts, self.graphs.vocab_size)
        if opts.do_sample:
            return _released(step, sample_steps(step, start_ids, rules, build_warpers(opts), opts, logprobs=logprobs,
                                                stop_rows=stop_rows, row_seeds=row_seeds))
        return _released(step, greedy_steps(step, start_ids, rules, opts, logprobs=logprobs, stop_rows=stop_rows))

    def token_scores(self, input_ids: Any, attention_mask: Any, sequences: np.ndarray, **options: Any) -> np.ndarray:
        """The score beam search gave each token of its answers (see runtime/search/scoring.py).

        input_ids, attention_mask: the [batch, src_len] inputs `generate` was given; sequences:
        [batch * n, length] int64, what it returned for them with these options (n answers per
        input). Returns [batch * n, length - 1] float32: log_softmax(logits) after the rules at each
        token, 0.0 after EOS; a row's scores sum to its beam score times length ** length_penalty.

        Raises:
            InvalidInputError: sequences is not [batch * n, length >= 2] int64; and as `generate`.
        """
        opts = self.options(**options)
        input_ids, attention_mask = self._check_inputs(input_ids, attention_mask, opts)
        sequences = np.asarray(sequences)
        batch = input_ids.shape[0]
        if sequences.ndim != 2 or sequences.shape[1] < 2 or sequences.shape[0] % batch \
                or not np.issubdtype(sequences.dtype, np.integer):
            raise InvalidInputError(f"sequences must be [batch * n, length >= 2] integers for {batch} inputs, got "
                                    f"shape {sequences.shape} dtype {sequences.dtype}")
        step, _ = self._start(input_ids, attention_mask, opts, sequences.shape[0] // batch)
        try:
            return score_tokens(step, sequences.astype(np.int64, copy=False),
                                build_rules(opts, self.graphs.vocab_size), opts.eos_token_ids)
        finally:
            step.release()

    def _token_stream(self, input_ids: np.ndarray, attention_mask: np.ndarray, opts: GenerationOptions,
                      repeat: int) -> Iterator[np.ndarray]:
        step, start_ids = self._start(input_ids, attention_mask, opts, repeat)
        rules = build_rules(opts, self.graphs.vocab_size)
        if opts.do_sample:
            return _released(step, sample_search(step, start_ids, rules, build_warpers(opts), opts))
        return _released(step, greedy_search(step, start_ids, rules, opts))

    def _start(self, input_ids: np.ndarray, attention_mask: np.ndarray, opts: GenerationOptions,
               repeat: int) -> tuple[CachedDecoder, np.ndarray]:
        """Run the encoder (rows repeated `repeat` times) and make this call's decoder."""
        encoded = self.graphs.encode(input_ids, attention_mask, repeat)
        start_ids = np.full(encoded.input_of_row.shape[0], opts.decoder_start_token_id, dtype=np.int64)
        return CachedDecoder(self.graphs, encoded, opts.total_max_length()), start_ids

    # -- text ---------------------------------------------------------------------------------------
    def generate_text(self, texts: Sequence[str] | str, *, truncate: bool = False, **options: Any) -> list[str]:
        """Tokenize, generate and detokenize. Returns batch * num_return_sequences texts, in input order.

        truncate: cut inputs longer than the model's maximum (with a warning) instead of raising.
        """
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise InvalidInputError("no input texts given")
        input_ids, attention_mask = self.encode_text(texts, truncate=truncate)
        return self.text.decode(self.generate(input_ids, attention_mask, **options))

    def generate_text_iter(self, texts: Iterable[str], *, batch_size: int = DEFAULT_BATCH_SIZE,
                           max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS, window: int = DEFAULT_WINDOW,
                           truncate: bool = False, **options: Any) -> Iterator[str | list[str]]:
        """Generate for every text of an iterable, read lazily, like CTranslate2's `translate_iterable`.

        Yields one result per input, in input order, as soon as it and every earlier one are known: a
        str, or a list of num_return_sequences str when that is > 1. Texts are read `window` at a time
        and sorted by length within it; batches hold at most `batch_size` inputs and `max_batch_tokens`
        padded source tokens (inputs x longest; None = no limit; a longer input runs alone). Memory
        grows with the window and batch, never with the iterable (see runtime/text_iter.py). Options
        are `generate`'s.

        Greedy and beam search give the texts `generate_text` gives (barring an exact float32 tie,
        which padding can tip). Sampling does not: each batch draws from `seed` anew, so an input's
        draws depend on the batch it lands in and its row there. The same texts with the same limits
        and seed give the same draws; with batch_size=1, each text draws what `generate_text([text])`
        draws.

        Raises:
            InvalidOptionError: a bad option or limit (at the call, before any text is read).
            InputItemError (an InvalidInputError), while iterating: an empty text, or one longer than
                the model's maximum without truncate; `.index` is its position in `texts`.
        """
        several = self.options(**options).num_return_sequences > 1
        results = self.generate_text_iter_with_scores(texts, batch_size=batch_size, max_batch_tokens=max_batch_tokens,
                                                      window=window, truncate=truncate, **options)
        return (result.texts if several else result.texts[0] for result in results)

    def generate_text_iter_with_scores(self, texts: Iterable[str], *, batch_size: int = DEFAULT_BATCH_SIZE,
                                       max_batch_tokens: int | None = DEFAULT_MAX_BATCH_TOKENS,
                                       window: int = DEFAULT_WINDOW, truncate: bool = False,
                                       **options: Any) -> Iterator[TextGeneration]:
        """`generate_text_iter`, yielding each input's `TextGeneration`: its texts, token ids (no batch
        padding) and beam scores. Raises what `generate_text_iter` raises."""
        limits = BatchLimits(batch_size, max_batch_tokens, window)
        self.options(**options)  # fail on a bad option now, not at the first result
        return generate_text_stream(self, texts, limits, truncate, options)

    def encode_text(self, texts: Sequence[str], truncate: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """texts -> input_ids, attention_mask: [batch, longest] int64, padded on the right."""
        limit = self.manifest.max_source_positions
        input_ids, attention_mask, truncated = self.text.encode(texts, max_length=limit, truncate=truncate)
        if truncated:
            warnings.warn(f"inputs {[i + 1 for i in truncated]} are longer than {limit} tokens and were truncated",
                          stacklevel=3)
        return input_ids, attention_mask

    @property
    def text(self) -> TextCodec:
        if self._text is None:  # built once; a race only builds it twice, both identical
            self._text = TextCodec(self.export_dir, self.manifest.tokenizer_file, self._pad_token_id)
        return self._text

    # -- options and checks ---------------------------------------------------------------------------
    def options(self, **overrides: Any) -> GenerationOptions:
        """Resolve call options over the exported generation defaults (transformers' precedence)."""
        m = self.manifest
        return GenerationOptions.resolve(m.generation_defaults, overrides, eos_token_ids=m.eos_token_ids,
                                         pad_token_id=m.pad_token_id, decoder_start_token_id=m.decoder_start_token_id,
                                         max_position_embeddings=m.max_target_positions)

    def _check_inputs(self, input_ids: Any, attention_mask: Any,
                      opts: GenerationOptions) -> tuple[np.ndarray, np.ndarray]:
        ids = id_matrix(input_ids, "input_ids", "src_len", "input")
        if attention_mask is None:
            mask = _infer_attention_mask(ids, opts)
        else:
            mask = np.asarray(attention_mask)
            if mask.ndim == 1:
                mask = mask[None, :]
            if mask.shape != ids.shape:
                raise InvalidInputError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
            mask = mask.astype(np.int64, copy=False)
        if (mask.sum(axis=1) == 0).any():
            raise InvalidInputError("an input row has no tokens (its attention_mask is all zeros)")
        vocab = self.manifest.vocab_size
        if ids.min() < 0 or ids.max() >= vocab:
            raise InvalidInputError(f"input_ids must lie in [0, {vocab}) (the vocabulary), "
                                    f"found {ids.min()}..{ids.max()}")
        limit = self.manifest.max_source_positions
        if limit is not None and ids.shape[1] > limit:
            raise InvalidInputError(f"input has {ids.shape[1]} tokens, more than the model's maximum of {limit}; "
                                    "shorten it or truncate it")
        return ids.astype(np.int64, copy=False), mask


def _read_manifest(export_dir: Path) -> Manifest:
    if (export_dir / MANIFEST_NAME).is_file() or not export_dir.is_dir():
        return Manifest.read(export_dir)
    if (export_dir / "encoder_model.onnx").is_file():  # written by `optimum-cli export onnx`
        from runtime.optimum_layout import manifest_from_optimum_dir

        return manifest_from_optimum_dir(export_dir)
    return Manifest.read(export_dir)  # raises the "not an export directory" error


def _infer_attention_mask(input_ids: np.ndarray, opts: GenerationOptions) -> np.ndarray:
    """transformers' `_prepare_attention_mask_for_generation`: mask out pad tokens when pad appears in
    the inputs and is not an EOS token; otherwise attend to everything."""
    pad = opts.pad_token_id
    if pad is not None and (input_ids == pad).any() and pad not in opts.eos_token_ids:
        return (input_ids != pad).astype(np.int64)
    return np.ones_like(input_ids, dtype=np.int64)


def id_matrix(value: Any, name: str, length: str, item: str) -> np.ndarray:
    """`value` as a [batch, length] integer array (a 1-D one is one row).

    Raises:
        InvalidInputError: not 1-D or 2-D integers, or no row or no token.
    """
    ids = np.asarray(value)
    if ids.ndim == 1:
        ids = ids[None, :]
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise InvalidInputError(f"{name} must be a 2-D integer array [batch, {length}], got shape {ids.shape} "
                                f"dtype {ids.dtype}")
    if ids.shape[0] == 0 or ids.shape[1] == 0:
        raise InvalidInputError(f"{name} is empty (shape {ids.shape}); give at least one token per {item}")
    return ids


def _released(step: CachedDecoder, steps: Iterator[T]) -> Iterator[T]:
    """`steps`, then the decoder's `release` once they end (run out, raise, or are closed)."""
    try:
        yield from steps
    finally:
        step.release()
