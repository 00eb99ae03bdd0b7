"""The decoding loop's machinery: run the encoder once, then step the decoder, feeding state back.

`EncoderDecoderGraphs` holds the loaded sessions of one export directory (shared, read-only).
`CachedDecoder` is one call's decoder (the `DecoderStep` of runtime/search): it owns that call's state
tensors, so concurrent calls on one model share nothing mutable.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import ExportDirError
from runtime.manifest import Manifest, StateTensor
from runtime.sessions import Graph, ProviderConfig, RowSelector

ENCODER_INPUT_IDS = "input_ids"
ENCODER_ATTENTION_MASK = "attention_mask"
ENCODER_HIDDEN = "last_hidden_state"
DECODER_INPUT_IDS = "input_ids"
DECODER_ENCODER_MASK = "encoder_attention_mask"
DECODER_ENCODER_HIDDEN = "encoder_hidden_states"
LOGITS = "logits"


@dataclass(frozen=True)
class EncoderOutputs:
    """What the decoder needs from the encoder, for `rows` = batch * beams rows (beam-major per input)."""

    attention_mask: np.ndarray  # [rows, src_len] int64
    values: dict[str, Any]  # encoder output name -> [rows, ...] (last_hidden_state and state inits)


class EncoderDecoderGraphs:
    """The sessions of one export directory. Built once per process; safe to share across threads."""

    def __init__(self, export_dir: Path, manifest: Manifest, config: ProviderConfig):
        self.manifest = manifest
        self.encoder = Graph(export_dir / manifest.encoder_file, config, spinning=False)
        self.decoder = Graph(export_dir / manifest.decoder_file, config)
        self.first_step = Graph(export_dir / manifest.first_step_file, config, spinning=False) \
            if manifest.first_step_file else None
        self.rows = RowSelector(config)
        self._check_io()
        # Encoder outputs the decoder needs: the hidden states (if any decoder graph reads them) and state inits.
        needs_hidden = any(DECODER_ENCODER_HIDDEN in g.inputs for g in self._decoder_graphs())
        self.encoder_outputs = ([ENCODER_HIDDEN] if needs_hidden else []) + \
            [s.encoder_output for s in manifest.states if s.init == "encoder"]
        self.vocab_size = self.decoder.outputs[LOGITS].shape[-1] if isinstance(
            self.decoder.outputs[LOGITS].shape[-1], int) else manifest.vocab_size

    def _decoder_graphs(self) -> list[Graph]:
        return [g for g in (self.first_step, self.decoder) if g is not None]

    def _check_io(self) -> None:
        """Fail at load, naming the graph and tensor, when the graphs do not match the manifest."""
        def require(graph: Graph, names: list[str], where: str) -> None:
            table = graph.inputs if where == "input" else graph.outputs
            missing = [n for n in names if n not in table]
            if missing:
                raise ExportDirError(
                    f"{graph.name} lacks {where}(s) {missing} that s2s.json names; the directory is "
                    "inconsistent, re-export the model"
                )

        m = self.manifest
        require(self.encoder, [ENCODER_INPUT_IDS], "input")
        require(self.encoder, [s.encoder_output for s in m.states if s.init == "encoder"], "output")
        require(self.decoder, [DECODER_INPUT_IDS] + [s.input_name for s in m.states], "input")
        require(self.decoder, [LOGITS], "output")
        if m.use_cache_branch:
            require(self.decoder, [m.use_cache_branch], "input")
        if self.first_step is not None:
            require(self.first_step, [DECODER_INPUT_IDS], "input")
            require(self.first_step, [LOGITS], "output")

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray, repeat: int) -> EncoderOutputs:
        """Run the encoder once. input_ids, attention_mask: [batch, src_len] int64.

        Each output row is repeated `repeat` times (beam search), beam-major per input like
        transformers' `_expand_inputs_for_generation`.
        """
        feeds = {ENCODER_INPUT_IDS: input_ids}
        if ENCODER_ATTENTION_MASK in self.encoder.inputs:
            feeds[ENCODER_ATTENTION_MASK] = attention_mask
        values = self.encoder.run(feeds, self.encoder_outputs)
        batch_axis = {ENCODER_HIDDEN: 0}
        batch_axis.update({s.encoder_output: s.batch_axis for s in self.manifest.states if s.init == "encoder"})
        if repeat > 1:
            rows = np.repeat(np.arange(input_ids.shape[0]), repeat)
            values = {name: self.rows.take(v, rows, batch_axis[name]) for name, v in values.items()}
            attention_mask = np.repeat(attention_mask, repeat, axis=0)
        return EncoderOutputs(attention_mask=attention_mask, values=values)


class CachedDecoder:
    """One call's decoder step (implements runtime.search.DecoderStep)."""

    def __init__(self, graphs: EncoderDecoderGraphs, encoded: EncoderOutputs):
        self._graphs = graphs
        self._mask = encoded.attention_mask  # [rows, src_len] int64
        self._hidden = encoded.values.get(ENCODER_HIDDEN)  # [rows, src_len, hidden] or None
        self._states: dict[str, Any] = {  # state input name -> value; filled from the encoder or step 0
            s.input_name: encoded.values[s.encoder_output] for s in graphs.manifest.states if s.init == "encoder"
        }
        self._step = 0

    @property
    def rows(self) -> int:
        return self._mask.shape[0]

    def __call__(self, input_ids: np.ndarray) -> np.ndarray:
        """input_ids: [rows] int64 -> logits [rows, vocab] float32."""
        graphs, manifest = self._graphs, self._graphs.manifest
        first = self._step == 0
        graph = graphs.first_step if first and graphs.first_step is not None else graphs.decoder
        feeds: dict[str, Any] = {DECODER_INPUT_IDS: input_ids.reshape(-1, 1)}
        if DECODER_ENCODER_MASK in graph.inputs:
            feeds[DECODER_ENCODER_MASK] = self._mask
        if DECODER_ENCODER_HIDDEN in graph.inputs:
            feeds[DECODER_ENCODER_HIDDEN] = self._hidden
        if manifest.use_cache_branch:
            feeds[manifest.use_cache_branch] = np.array([not first])
        wanted = [LOGITS]
        for state in manifest.states:
            if state.input_name in graph.inputs:
                value = self._states.get(state.input_name)
                feeds[state.input_name] = value if value is not None else self._empty(graph, state)
            # A fixed state, once known, is never rebound: optimum's merged graph re-emits it each step.
            if state.output_name in graph.outputs and not (state.kind == "fixed" and state.input_name in self._states):
                wanted.append(state.output_name)
        results = graph.run(feeds, wanted, host_outputs=(LOGITS,))
        for state in manifest.states:
            if state.output_name in results:
                self._states[state.input_name] = results[state.output_name]
        self._step += 1
        logits = results[LOGITS]  # [rows, 1, vocab]
        return logits[:, -1, :].astype(np.float32, copy=False)

    def select(self, rows: np.ndarray) -> None:
        """Keep state rows `rows` ([new_rows] int64), in that order."""
        if rows.shape[0] == self.rows and np.array_equal(rows, np.arange(self.rows)):
            return
        self._mask = np.take(self._mask, rows, axis=0)
        if self._hidden is not None:
            self._hidden = self._graphs.rows.take(self._hidden, rows, 0)
        by_input = {s.input_name: s for s in self._graphs.manifest.states}
        self._states = {name: self._graphs.rows.take(v, rows, by_input[name].batch_axis)
                        for name, v in self._states.items()}

    def _empty(self, graph: Graph, state: StateTensor) -> np.ndarray:
        """A zero-length state for step 0: symbolic dims are the batch axis (rows) or length 0."""
        spec = graph.inputs[state.input_name]
        shape = [self.rows if axis == state.batch_axis else (dim if isinstance(dim, int) else 0)
                 for axis, dim in enumerate(spec.shape)]
        return np.zeros(shape, dtype=spec.dtype)
