"""The export-directory contract: `s2s.json`, written by the exporter, read by the runtime.

Standard library only. The runtime learns graph names from this file and nothing else; the exporter
writes it with `Manifest.write` (it imports this module, never the other way round).

A *state tensor* is a decoder input fed from an output of the previous step. With that one rule the
decoding loop needs no code per architecture: T5/BART self-attention K/V (`grows`), cross-attention
K/V (`fixed` once computed) and LSTM (h, c) (`recurrent`) all flow through it, and beam search
reorders all of them with one gather along `batch_axis`.

How step 0 gets its states (the three layouts the runtime runs):
- `init="encoder"`: the encoder graph emits the initial value as output `encoder_output`
  (cross-attention K/V computed once beside the encoder; LSTM (h, c) from the encoder).
- `init="empty"`: step 0 feeds a tensor of length 0 along `seq_axis` (self-attention K/V).
  In optimum's merged decoder (`use_cache_branch` set) every past input is fed empty at step 0 and
  the graph's no-cache branch produces them.
- with `first_step_file` set (optimum's split layout), step 0 runs that graph, which has no state
  inputs at all; its outputs become the states.

A `buffer` state is self-attention K/V kept in a preallocated tensor [rows, heads, capacity, head_dim]
that the decoder writes in place (exporter/passes/kv_buffer.py): the runtime allocates it once per call
(zeros, `init="empty"`), binds the same tensor as the input and the output, and feeds the decoder the
lengths `SEQLENS_K` ([rows] int32, the positions already written) and `TOTAL_SEQUENCE_LENGTH` ([]
int32, that plus the new one). Reorders touch only the positions written.

`shared_weights` lists the tensors that two or more graphs hold identically (the embedding table of
the encoder and the decoder): each lies once in `shared_weights.bin`, page-aligned, which every graph
naming it reads as standard ONNX external data (exporter/passes/shared_weights.py). onnxruntime maps such
data into memory instead of copying it, so the sessions share the file's pages. The runtime only checks
that the file is there and long enough (`Manifest.check_shared_weights`), to fail with one clear line.

What a directory holds is its `kind` (absent in older manifests: an encoder-decoder):
- "encoder-decoder": the above.
- "decoder-only": a language model (models/ SimpleDecoderOnly, DecoderOnly). No encoder graph and no
  decoder start token: `decoder_file` takes input_ids [rows, new_len] (the prompt, then one token per
  step), attention_mask [rows, past_len + new_len] and the states, all `grows` from `empty`.
- "regressor": a sequence-to-sequence regressor on float features (models/ SimpleEncoderDecoder). No
  tokens (no vocabulary, special tokens, tokenizer or generation defaults); `features` gives the
  sizes of its float inputs and outputs, and the states are recurrent, from the encoder.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from runtime.errors import ExportDirError, ManifestVersionError
from runtime.json_file import read_json_object

MANIFEST_NAME = "s2s.json"
FORMAT_VERSION = 1

StateKind = Literal["grows", "fixed", "recurrent", "buffer"]
STATE_KINDS = ("grows", "fixed", "recurrent", "buffer")
StateInit = Literal["empty", "encoder"]
ENCODER_DECODER, DECODER_ONLY, REGRESSOR = KINDS = ("encoder-decoder", "decoder-only", "regressor")

# The graph inputs and outputs the runtime feeds and reads, besides the states (whose names `states`
# gives). optimum's names; s2s-export writes them for every source. A graph taking another input is
# refused at load (`Manifest.check_feedable`).
INPUT_IDS = "input_ids"  # encoder [batch, src_len] int64; decoder [rows, new_len] int64 (new_len 1 but decoder-only)
ATTENTION_MASK = "attention_mask"  # encoder [batch, src_len] int64; decoder-only decoder [rows, past_len + new_len]
LAST_HIDDEN_STATE = "last_hidden_state"  # encoder output [batch, src_len, hidden] float
ENCODER_ATTENTION_MASK = "encoder_attention_mask"  # decoder input [rows, src_len] int64
ENCODER_HIDDEN_STATES = "encoder_hidden_states"  # decoder input [rows, src_len, hidden] float: last_hidden_state
LOGITS = "logits"  # decoder output [rows, new_len, vocab] float
# with `buffer` states (see the module docstring): decoder inputs [rows] int32 and [] int32
SEQLENS_K = "seqlens_k"
TOTAL_SEQUENCE_LENGTH = "total_sequence_length"
# with a greedy head (`Manifest.greedy_head`, exporter/passes/greedy_head.py): decoder inputs [1] int64 (the
# leading rows that get logits; the rest get next_ids) and [vocab] float (added before the head's argmax),
# decoder output [head rows, 1] int64
LOGITS_ROWS = "logits_rows"
GREEDY_BIAS = "greedy_bias"
NEXT_IDS = "next_ids"
GREEDY_HEADS = ("argmax", "screened")
# a regressor's float features (see `FloatFeatures`)
SRC = "src"  # encoder input
DECODER_INPUTS = "decoder_inputs"  # decoder input
OUTPUTS = "outputs"  # decoder output

# What the runtime feeds each graph of a kind (a name only where the graph declares it), besides states.
_FEEDS: dict[str, dict[str, tuple[str, ...]]] = {
    ENCODER_DECODER: {"encoder": (INPUT_IDS, ATTENTION_MASK),
                      "decoder": (INPUT_IDS, ENCODER_ATTENTION_MASK, ENCODER_HIDDEN_STATES, SEQLENS_K,
                                  TOTAL_SEQUENCE_LENGTH)},
    DECODER_ONLY: {"encoder": (), "decoder": (INPUT_IDS, ATTENTION_MASK)},
    REGRESSOR: {"encoder": (SRC,), "decoder": (DECODER_INPUTS,)},
}


@dataclass(frozen=True)
class StateTensor:
    input_name: str  # decoder input, e.g. "past_key_values.0.decoder.key"
    output_name: str | None  # decoder output fed back next step, e.g. "present.0.decoder.key";
    #                          None: the decoder never re-emits it (a fixed state from the encoder)
    batch_axis: int  # beam search gathers along this axis
    seq_axis: int | None  # the axis a "grows" state grows along (and a "fixed" one's source length)
    kind: StateKind  # grows: self-attn K/V; fixed: cross-attn K/V; recurrent: LSTM h/c; buffer: K/V in place
    init: StateInit = "empty"  # where step 0 takes it from (see module docstring)
    encoder_output: str | None = None  # with init="encoder": the encoder output holding it

    def sizes(self, rows: int, length: int) -> dict[int, int]:
        """{axis: size} for this state holding `rows` rows and `length` positions (its other axes are fixed)."""
        sizes = {self.batch_axis: rows}
        if self.seq_axis is not None:
            sizes[self.seq_axis] = length
        return sizes


SHARED_WEIGHTS_FILE = "shared_weights.bin"
_ITEMSIZES = {"float32": 4, "float16": 2, "int8": 1, "uint8": 1, "int32": 4, "int64": 8}  # numpy's names
SHARED_WEIGHT_DTYPES = tuple(_ITEMSIZES)


@dataclass(frozen=True)
class SharedWeight:
    """One tensor several graphs hold: `file` bytes [offset, offset + its size) of the export directory,
    row-major, little-endian."""

    file: str  # beside the graphs, e.g. "shared_weights.bin"
    offset: int
    dtype: str  # numpy's name, one of SHARED_WEIGHT_DTYPES
    shape: tuple[int, ...]
    names: dict[str, str]  # graph file -> the initializer's name in that graph

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * _ITEMSIZES[self.dtype]


@dataclass(frozen=True)
class FloatFeatures:
    """A regressor's float inputs and outputs: the size of their last axis (all float32)."""

    input_dim: int  # encoder input `src`: [batch, src_len, input_dim]
    decoder_input_dim: int  # decoder input `decoder_inputs`: [rows, tgt_len, decoder_input_dim]
    output_dim: int  # decoder output `outputs`: [rows, tgt_len, output_dim]


@dataclass(frozen=True)
class Manifest:
    encoder_file: str | None  # input_ids, attention_mask -> last_hidden_state (+ state outputs); None: decoder-only
    decoder_file: str  # the cached step: input_ids [rows, 1] + states -> logits + states
    states: tuple[StateTensor, ...]
    eos_token_ids: tuple[int, ...]  # () for a regressor
    pad_token_id: int | None  # None for a regressor
    decoder_start_token_id: int | None  # None for a decoder-only model (the prompt starts it) and a regressor
    vocab_size: int | None  # None for a regressor
    format_version: int = FORMAT_VERSION
    kind: str = ENCODER_DECODER  # one of KINDS (see module docstring); runtime.load picks its model class by it
    features: FloatFeatures | None = None  # regressor only
    first_step_file: str | None = None  # split layout: step 0 runs this graph (no state inputs)
    use_cache_branch: str | None = None  # merged layout: bool input, False at step 0, True after
    max_source_positions: int | None = None  # longest input the encoder accepts; None: no limit
    max_target_positions: int | None = None  # longest decoder sequence (positions); None: no limit
    model_type: str = ""  # informational ("t5", "bart", "lstm", ...): the runtime never branches on it
    source: str = ""  # "hf", "custom", or "optimum-dir" (derived from an optimum-cli directory)
    precision: str = "fp32"  # fp32 | fp16 | int8 | int4 (of the weights that dominate)
    passes: tuple[str, ...] = ()  # post-export passes applied, in order
    quantization: dict[str, Any] = field(default_factory=dict)  # int8/int4: the scheme (informational); {}: none
    versions: dict[str, str] = field(default_factory=dict)  # packages used to export
    tokenizer_file: str | None = None  # tokenizer.json for the `tokenizers` package, if any
    generation_defaults: dict[str, Any] = field(default_factory=dict)  # from generation_config.json
    shared_weights: tuple[SharedWeight, ...] = ()  # tensors held once for several graphs (module docstring)
    greedy_head: str | None = None  # one of GREEDY_HEADS: the decoder chooses greedy's next ids itself

    @property
    def graph_files(self) -> tuple[str, ...]:
        """The graph files this manifest names, encoder first (none for a decoder-only model)."""
        return tuple(f for f in (self.encoder_file, self.first_step_file, self.decoder_file) if f)

    @classmethod
    def read(cls, export_dir: str | os.PathLike) -> Manifest:
        """Read `export_dir/s2s.json`.

        Raises:
            ExportDirError: the directory or manifest is missing, or the manifest is malformed.
            ManifestVersionError: the manifest has a format version this runtime does not read.
        """
        export_dir = Path(export_dir)
        path = export_dir / MANIFEST_NAME
        if not export_dir.is_dir():
            raise ExportDirError(f"export directory {str(export_dir)!r} does not exist; "
                                 "pass the directory s2s-export wrote")
        if not path.is_file():
            raise ExportDirError(
                f"{str(export_dir)!r} has no {MANIFEST_NAME}: it is not an s2s export directory "
                "(export it with `s2s-export MODEL -o DIR`)"
            )
        return cls.from_dict(read_json_object(path, ExportDirError, "re-export the model"), where=str(path))

    @classmethod
    def from_dict(cls, raw: Any, where: str = MANIFEST_NAME) -> Manifest:
        if not isinstance(raw, dict):
            raise ExportDirError(f"{where}: expected a JSON object, found {type(raw).__name__}")
        version = raw.get("format_version")
        if version != FORMAT_VERSION:
            raise ManifestVersionError(
                f"{where}: format version {version!r}, this runtime reads version {FORMAT_VERSION}; "
                "re-export the model with this version of s2s-export"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ExportDirError(f"{where}: unknown fields {unknown}; re-export the model with this version of s2s")
        try:
            states = tuple(StateTensor(**s) for s in raw.get("states", ()))
            values = dict(raw, states=states)
            values["shared_weights"] = tuple(SharedWeight(**dict(w, shape=tuple(w.get("shape", ()))))
                                             for w in raw.get("shared_weights", ()))
            if isinstance(values.get("features"), dict):
                values["features"] = FloatFeatures(**values["features"])
            for name in ("eos_token_ids", "passes"):
                if name in values:
                    values[name] = tuple(values[name])
            manifest = cls(**values)
        except (TypeError, AttributeError) as err:
            raise ExportDirError(f"{where}: malformed manifest ({err}); re-export the model") from None
        manifest.check()
        return manifest

    def check(self) -> None:
        """Raise ExportDirError naming the first inconsistent field."""
        def fail(msg: str) -> None:
            raise ExportDirError(f"{MANIFEST_NAME}: {msg}; re-export the model")

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        if self.kind not in KINDS:
            fail(f"kind must be one of {list(KINDS)}, found {self.kind!r}")
        # the token fields each kind has; the others must be null (a regressor has no tokens at all)
        token_fields = {ENCODER_DECODER: ("pad_token_id", "decoder_start_token_id", "vocab_size"),
                        DECODER_ONLY: ("pad_token_id", "vocab_size"), REGRESSOR: ()}[self.kind]
        for name in ("pad_token_id", "decoder_start_token_id", "vocab_size"):
            if name not in token_fields and getattr(self, name) is not None:
                fail(f"a {self.kind} manifest has no {name}, found {getattr(self, name)!r}")
        for name in token_fields:
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                fail(f"{name} must be a non-negative integer, found {getattr(self, name)!r}")
        self._check_kind(fail, is_int)
        self._check_shared_weights(fail, is_int)
        for name in ("max_source_positions", "max_target_positions"):
            if getattr(self, name) is not None and (not is_int(getattr(self, name)) or getattr(self, name) < 1):
                fail(f"{name} must be a positive integer or null, found {getattr(self, name)!r}")
        for name in ("encoder_file", "decoder_file") if self.kind != DECODER_ONLY else ("decoder_file",):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                fail(f"{name} must name a graph file, found {getattr(self, name)!r}")
        if self.greedy_head is not None and (self.greedy_head not in GREEDY_HEADS or self.kind != ENCODER_DECODER):
            fail(f"greedy_head must be null or one of {list(GREEDY_HEADS)} (encoder-decoder only), "
                 f"found {self.greedy_head!r}")
        for name in ("generation_defaults", "quantization"):
            if not isinstance(getattr(self, name), dict):
                fail(f"{name} must be an object, found {type(getattr(self, name)).__name__}")
        if self.kind != REGRESSOR and (not self.eos_token_ids or not all(is_int(t) and t >= 0
                                                                     for t in self.eos_token_ids)):
            fail(f"eos_token_ids must be a non-empty list of token ids, found {list(self.eos_token_ids)!r}")
        for s in self.states:
            if not is_int(s.batch_axis) or s.batch_axis < 0 or (s.seq_axis is not None and not is_int(s.seq_axis)):
                fail(f"state {s.input_name!r} has an invalid batch_axis/seq_axis")
            if s.kind not in STATE_KINDS:
                fail(f"state {s.input_name!r} has unknown kind {s.kind!r}")
            if s.init not in ("empty", "encoder"):
                fail(f"state {s.input_name!r} has unknown init {s.init!r}")
            if s.init == "encoder" and not s.encoder_output:
                fail(f"state {s.input_name!r} is initialised by the encoder but names no encoder_output")
            if s.output_name is None and s.init != "encoder":
                fail(f"state {s.input_name!r} is neither fed back nor given by the encoder")
            if s.kind == "buffer" and (s.init != "empty" or s.output_name is None or s.seq_axis is None):
                fail(f"buffer state {s.input_name!r} must start empty, name its output and its seq_axis")

    def check_shared_weights(self, export_dir: str | os.PathLike) -> None:
        """Raise ExportDirError if a file `shared_weights` names is missing or shorter than it says."""
        for w in self.shared_weights:
            path = Path(export_dir) / w.file
            if not path.is_file():
                raise ExportDirError(f"{w.file!r} is missing from {str(export_dir)!r} ({MANIFEST_NAME} names it); "
                                     "re-export the model")
            if path.stat().st_size < w.offset + w.nbytes:
                raise ExportDirError(f"{str(path)!r} is truncated: {MANIFEST_NAME} places {w.nbytes} bytes at "
                                     f"offset {w.offset}; re-export the model")

    def _check_shared_weights(self, fail: Callable[[str], None], is_int: Callable[[Any], bool]) -> None:
        graphs = set(self.graph_files)
        for w in self.shared_weights:
            if not isinstance(w.file, str) or not w.file or "/" in w.file or "\\" in w.file:
                fail(f"a shared weight must name a file beside the graphs, found {w.file!r}")
            if not is_int(w.offset) or w.offset < 0 or w.dtype not in SHARED_WEIGHT_DTYPES:
                fail(f"shared weight in {w.file!r} has an invalid offset or dtype ({w.offset!r}, {w.dtype!r})")
            if not all(is_int(d) and d >= 0 for d in w.shape):
                fail(f"shared weight at {w.file!r} offset {w.offset} has an invalid shape {list(w.shape)!r}")
            if not isinstance(w.names, dict) or not w.names or not set(w.names) <= graphs or not all(
                    isinstance(n, str) and n for n in w.names.values()):
                fail(f"shared weight at {w.file!r} offset {w.offset} must map graph files of this manifest to "
                     f"initializer names, found {w.names!r}")

    def _check_kind(self, fail: Callable[[str], None], is_int: Callable[[Any], bool]) -> None:
        """What the decoder-only and regressor kinds require beyond the common fields."""
        if self.kind != REGRESSOR and self.features is not None:
            fail(f"features belong to a regressor manifest, not a {self.kind} one")
        if self.kind == DECODER_ONLY:
            for name in ("encoder_file", "first_step_file", "use_cache_branch", "max_source_positions"):
                if getattr(self, name) is not None:
                    fail(f"a decoder-only manifest has no {name}, found {getattr(self, name)!r}")
            for s in self.states:
                if (s.kind, s.init) != ("grows", "empty") or s.output_name is None:
                    fail(f"state {s.input_name!r} of a decoder-only model must grow from empty and be fed back")
        if self.kind == REGRESSOR:
            f = self.features
            if not isinstance(f, FloatFeatures) or not all(
                    is_int(getattr(f, n)) and getattr(f, n) > 0
                    for n in ("input_dim", "decoder_input_dim", "output_dim")):
                fail(f"a regressor manifest needs features with positive input_dim, decoder_input_dim and output_dim, "
                     f"found {f!r}")
            if self.eos_token_ids or self.tokenizer_file is not None or self.generation_defaults:
                fail("a regressor manifest has no tokens: eos_token_ids must be empty, tokenizer_file and "
                     "generation_defaults unset")
            if self.first_step_file is not None or self.use_cache_branch is not None:
                fail("a regressor manifest has no first_step_file or use_cache_branch")
            for s in self.states:
                if (s.kind, s.init) != ("recurrent", "encoder") or s.output_name is None:
                    fail(f"state {s.input_name!r} of a regressor must be recurrent, from the encoder, and fed back")

    def check_feedable(self, graph_name: str, inputs: Iterable[str], role: Literal["encoder", "decoder"]) -> None:
        """Refuse a graph that takes an input the runtime does not feed (a newer exporter's `cache_position`,
        say): at load, rather than as an onnxruntime error mid-generate.

        inputs: the graph's declared input names; role: whether it runs as the encoder or as a decoder step
        (a decoder is fed its kind's names, the states' inputs and `use_cache_branch`).

        Raises:
            ExportDirError: naming the graph and every input it takes that the runtime does not feed.
        """
        fed = set(_FEEDS[self.kind][role])
        if role == "decoder":
            fed.update(s.input_name for s in self.states)
            fed.update([self.use_cache_branch] if self.use_cache_branch else [])
            fed.update([LOGITS_ROWS, GREEDY_BIAS] if self.greedy_head else [])
        unfed = [name for name in inputs if name not in fed]
        if unfed:
            raise ExportDirError(
                f"{graph_name} takes input(s) {unfed} that the runtime does not feed (it feeds the {self.kind} "
                f"{role} {', '.join(_FEEDS[self.kind][role])} and the states s2s.json names); export the model "
                "with this version of s2s-export")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["states"] = [asdict(s) for s in self.states]
        out["shared_weights"] = [dict(asdict(w), shape=list(w.shape)) for w in self.shared_weights]
        return out

    def write(self, export_dir: str | os.PathLike) -> Path:
        """Write s2s.json atomically (temp file + rename): the manifest is the last file of an export."""
        self.check()
        export_dir = Path(export_dir)
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"
        fd, tmp = tempfile.mkstemp(dir=export_dir, prefix=".s2s-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes it 0600; an export directory is meant to be shared
        target = export_dir / MANIFEST_NAME
        os.replace(tmp, target)
        return target


def encoder_inits(states: Iterable[StateTensor]) -> dict[str, str]:
    """State input name -> the encoder output it starts from, for the states with init="encoder"."""
    return {s.input_name: s.encoder_output for s in states if s.init == "encoder" and s.encoder_output is not None}


def fed_back(states: Iterable[StateTensor]) -> dict[str, str]:
    """State input name -> the decoder output that feeds it the next step, for the states that have one."""
    return {s.input_name: s.output_name for s in states if s.output_name is not None}


def installed_versions(names: tuple[str, ...]) -> dict[str, str]:
    """Versions of the named distributions that are installed (for the manifest's and reports' records)."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions
