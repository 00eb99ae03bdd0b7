"""Derive the manifest of a directory in optimum's ONNX layout from its graphs and config files.

`optimum-cli export onnx` (and s2s-export's HF source, which uses the same exporter) write:
- `encoder_model.onnx`: input_ids, attention_mask -> last_hidden_state;
- either the merged decoder `decoder_model_merged.onnx` (a `use_cache_branch` bool input picks the
  first-step or the cached branch, weights stored once), or the split pair `decoder_model.onnx`
  (step 0, no past inputs) + `decoder_with_past_model.onnx` (cached steps);
- `config.json`, `generation_config.json` and the tokenizer files.

Everything the runtime needs is read from the graphs' declared inputs and outputs (names, symbolic
shapes, element types) and from the two JSON files: no torch, transformers or onnx import, so the
runtime can run such a directory as it is. The exporter writes `s2s.json` with the same function.

Loading the graphs into sessions (optimizations off) only to read their IO costs one extra load of
each file; it is paid once, when a directory without `s2s.json` is opened.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import ExportDirError
from runtime.json_file import read_json_object
from runtime.manifest import INPUT_IDS, LAST_HIDDEN_STATE, LOGITS, Manifest, StateKind, StateTensor
from runtime.options import GenerationOptions
from runtime.sessions import GraphIO, read_graph_io

ENCODER_FILE = "encoder_model.onnx"
MERGED_DECODER_FILE = "decoder_model_merged.onnx"
FIRST_STEP_FILE = "decoder_model.onnx"
WITH_PAST_FILE = "decoder_with_past_model.onnx"
USE_CACHE_BRANCH = "use_cache_branch"
TOKENIZER_FILE = "tokenizer.json"

# optimum names the cache `past_key_values.{layer}.{decoder|encoder}.{key|value}` on the way in and
# `present.{...}` on the way out; "decoder" is self-attention (grows one position per step),
# "encoder" cross-attention (computed once from the encoder output, then fixed).
_PAST_INPUT = re.compile(r"^past_key_values\.(\d+)\.(decoder|encoder)\.(key|value)$")
_PAST_PREFIX, _PRESENT_PREFIX = "past_key_values.", "present."
_KIND_OF_ATTENTION: dict[str, StateKind] = {"decoder": "grows", "encoder": "fixed"}

# config.json keys holding the longest source an encoder with absolute (learned or sinusoidal)
# positions accepts, first match wins. Models with relative positions (T5, mT5, LongT5) have none:
# their limit is None. (T5's old `n_positions` is informational, not a limit, so it is not listed.)
MAX_SOURCE_POSITION_KEYS = ("max_encoder_position_embeddings", "max_position_embeddings")
MAX_TARGET_POSITION_KEYS = ("max_decoder_position_embeddings", "max_position_embeddings")

# generation_config.json bookkeeping that is not a generation option.
_GENERATION_METADATA = ("_from_model_config", "transformers_version")

_FLOAT_PRECISION: dict[type, str] = {np.float32: "fp32", np.float16: "fp16"}


def manifest_from_optimum_dir(export_dir: str | Path) -> Manifest:
    """Build the manifest of an optimum-layout directory (merged or split decoder).

    Raises:
        ExportDirError: a graph or config file is missing or unreadable, or the graphs do not
            follow optimum's naming (so the cache cannot be wired without guessing).
    """
    export_dir = Path(export_dir)
    if not (export_dir / ENCODER_FILE).is_file():
        raise ExportDirError(f"{str(export_dir)!r} has no {ENCODER_FILE}: it is neither an s2s export (s2s.json) "
                             "nor an optimum ONNX export; export it with `s2s-export MODEL -o DIR`")
    config = _read_json(export_dir / "config.json", required=True)
    generation_config = _read_json(export_dir / "generation_config.json", required=False)

    encoder = read_graph_io(export_dir / ENCODER_FILE)
    if INPUT_IDS not in encoder.inputs or LAST_HIDDEN_STATE not in encoder.outputs:
        raise ExportDirError(f"{ENCODER_FILE} does not take input_ids and return last_hidden_state as optimum's "
                             "encoders do; re-export the model")
    decoder, first_step = _decoders(export_dir)
    first_step_file = None if first_step is decoder else first_step.name
    states = _states(decoder, first_step)
    eos_token_ids = _eos_token_ids(config, generation_config)
    logits_dim = decoder.outputs[LOGITS].shape[-1]
    vocab_size = logits_dim if isinstance(logits_dim, int) else config.get("vocab_size")
    if not isinstance(vocab_size, int):
        raise ExportDirError(f"cannot tell the vocabulary size: the logits of {decoder.name} have a symbolic last "
                             "dimension and config.json has no vocab_size; add vocab_size to config.json")
    return Manifest(
        encoder_file=ENCODER_FILE,
        decoder_file=decoder.name,
        first_step_file=first_step_file,
        use_cache_branch=USE_CACHE_BRANCH if first_step_file is None else None,
        states=states,
        eos_token_ids=eos_token_ids,
        pad_token_id=_first_int("pad_token_id", generation_config, config, default=eos_token_ids[0]),
        decoder_start_token_id=_decoder_start_token_id(config, generation_config),
        vocab_size=vocab_size,
        max_source_positions=_positions(config, MAX_SOURCE_POSITION_KEYS),
        max_target_positions=_positions(config, MAX_TARGET_POSITION_KEYS),
        model_type=str(config.get("model_type", "")),
        source="optimum-dir",
        precision=_FLOAT_PRECISION.get(encoder.outputs[LAST_HIDDEN_STATE].dtype, "fp32"),
        versions={"transformers": config["transformers_version"]} if "transformers_version" in config else {},
        tokenizer_file=TOKENIZER_FILE if (export_dir / TOKENIZER_FILE).is_file() else None,
        generation_defaults=_generation_defaults(config, generation_config),
    )


def _decoders(export_dir: Path) -> tuple[GraphIO, GraphIO]:
    """The cached decoder and the graph that runs step 0: the merged decoder twice, or the split pair.

    Raises:
        ExportDirError: neither layout is there, or a decoder lacks optimum's inputs and outputs.
    """
    if (export_dir / MERGED_DECODER_FILE).is_file():
        decoder = first_step = read_graph_io(export_dir / MERGED_DECODER_FILE)
        if USE_CACHE_BRANCH not in decoder.inputs:
            raise ExportDirError(f"{MERGED_DECODER_FILE} has no {USE_CACHE_BRANCH} input; re-export the model")
    elif (export_dir / FIRST_STEP_FILE).is_file() and (export_dir / WITH_PAST_FILE).is_file():
        decoder = read_graph_io(export_dir / WITH_PAST_FILE)
        first_step = read_graph_io(export_dir / FIRST_STEP_FILE)
    else:
        found = sorted(p.name for p in export_dir.glob("*.onnx"))
        raise ExportDirError(
            f"{str(export_dir)!r} has no cached decoder: expected {MERGED_DECODER_FILE}, or {FIRST_STEP_FILE} with "
            f"{WITH_PAST_FILE}; found {found}. Export with past key values (`optimum-cli export onnx --task "
            "text2text-generation-with-past`, or `s2s-export MODEL -o DIR`)"
        )
    for graph in {id(g): g for g in (decoder, first_step)}.values():
        if INPUT_IDS not in graph.inputs or LOGITS not in graph.outputs:
            raise ExportDirError(f"{graph.name} does not take input_ids and return logits; re-export the model")
    return decoder, first_step


def _states(decoder: GraphIO, first_step: GraphIO) -> tuple[StateTensor, ...]:
    """One StateTensor per cache input of the cached decoder, in the graph's input order.

    A grows state is fed back from the cached decoder's output. A fixed state is set once, from the
    output of the graph that runs step 0 (the merged graph, or the split layout's first-step graph,
    since optimum's with-past graph does not re-emit cross-attention K/V).
    """
    batch_symbol = decoder.inputs[INPUT_IDS].shape[0]
    states = []
    for name, spec in decoder.inputs.items():
        match = _PAST_INPUT.match(name)
        if match is None:
            continue
        kind = _KIND_OF_ATTENTION[match.group(2)]
        output_name = _PRESENT_PREFIX + name[len(_PAST_PREFIX):]
        source = decoder if kind == "grows" else first_step
        if output_name not in source.outputs:
            raise ExportDirError(f"{source.name} has input {name!r} but no output {output_name!r} to feed it from; "
                                 "re-export the model")
        batch_axis, seq_axis = _batch_and_sequence_axes(name, spec.shape, batch_symbol, decoder.name)
        states.append(StateTensor(input_name=name, output_name=output_name, batch_axis=batch_axis, seq_axis=seq_axis,
                                  kind=kind, init="empty"))
    if not states:
        raise ExportDirError(f"{decoder.name} has no past_key_values.* inputs: it is not a cached decoder; export "
                             "with past key values (`--task text2text-generation-with-past`)")
    return tuple(states)


def _batch_and_sequence_axes(name: str, shape: tuple, batch_symbol: Any, graph: str) -> tuple[int, int]:
    """The batch axis carries the decoder input_ids' batch symbol; the sequence axis is the other symbolic one."""
    symbolic = [axis for axis, dim in enumerate(shape) if isinstance(dim, str)]
    batch = [axis for axis in symbolic if shape[axis] == batch_symbol]
    sequence = [axis for axis in symbolic if shape[axis] != batch_symbol]
    if len(batch) != 1 or len(sequence) != 1:
        raise ExportDirError(f"cannot tell the batch and sequence axes of {graph} input {name!r} from its declared "
                             f"shape {list(shape)}; re-export the model with dynamic axes")
    return batch[0], sequence[0]


def _read_json(path: Path, required: bool) -> dict[str, Any]:
    if not path.is_file():
        if required:
            raise ExportDirError(f"{str(path.parent)!r} has no {path.name}; copy it from the model the graphs "
                                 "were exported from")
        return {}
    return read_json_object(path, ExportDirError, "copy it again from the original model")


def _first_int(key: str, *sources: dict[str, Any], default: int | None = None) -> int | None:
    """The first integer under `key` in sources (generation_config.json first, like transformers)."""
    for source in sources:
        value = source.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return default


def _eos_token_ids(config: dict[str, Any], generation_config: dict[str, Any]) -> tuple[int, ...]:
    for source in (generation_config, config):
        eos = source.get("eos_token_id")
        if isinstance(eos, int) and not isinstance(eos, bool):
            return (eos,)
        if isinstance(eos, list) and eos and all(isinstance(t, int) for t in eos):
            return tuple(eos)
    raise ExportDirError("neither generation_config.json nor config.json gives an eos_token_id; add the model's "
                         "end-of-sequence id to generation_config.json")


def _decoder_start_token_id(config: dict[str, Any], generation_config: dict[str, Any]) -> int:
    # transformers' `_get_decoder_start_token_id`: decoder_start_token_id, else bos_token_id.
    start = _first_int("decoder_start_token_id", generation_config, config)
    if start is None:
        start = _first_int("bos_token_id", generation_config, config)
    if start is None:
        raise ExportDirError("neither generation_config.json nor config.json gives a decoder_start_token_id (or "
                             "bos_token_id); add it to generation_config.json")
    return start


def _positions(config: dict[str, Any], keys: tuple[str, ...]) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _generation_defaults(config: dict[str, Any], generation_config: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json without its bookkeeping; for old checkpoints without one, the generation
    options that config.json carries (what transformers' GenerationConfig.from_model_config takes)."""
    if generation_config:
        return {k: v for k, v in generation_config.items() if k not in _GENERATION_METADATA}
    option_names = {f.name for f in fields(GenerationOptions)}
    return {k: v for k, v in config.items() if k in option_names and v is not None}
