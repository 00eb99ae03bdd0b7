"""Run an export directory's graphs position by position with plain onnxruntime sessions.

Validation's independent view of the graphs: it follows only the manifest (which graph runs at step 0,
which outputs feed which inputs) and shares no code with the runtime's decoding loop, so a wrong
manifest or a broken graph shows up as a logits difference against PyTorch. The fp16 pass also uses
it, to record the inputs each graph sees on sample data.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from runtime.manifest import (
    ATTENTION_MASK,
    ENCODER_ATTENTION_MASK,
    ENCODER_HIDDEN_STATES,
    GREEDY_BIAS,
    INPUT_IDS,
    LAST_HIDDEN_STATE,
    LOGITS,
    LOGITS_ROWS,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
    Manifest,
    encoder_inits,
)
from runtime.sessions import ORT_TYPES

# Called with (graph file, feeds) before each run.
RunHook = Callable[[str, dict[str, np.ndarray]], None]


def cpu_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # load-time notes (e.g. unused initializers) are not the user's concern
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


class GraphRunner:
    def __init__(self, export_dir: Path, manifest: Manifest, on_run: RunHook | None = None):
        assert manifest.encoder_file is not None  # an encoder-decoder (validate_kinds.py runs the other kinds)
        self.manifest = manifest
        self._encoder_file = manifest.encoder_file
        self._on_run = on_run
        files = {manifest.encoder_file, manifest.decoder_file}
        if manifest.first_step_file is not None:
            files.add(manifest.first_step_file)
        self._sessions = {name: cpu_session(export_dir / name) for name in files}

    def _run(self, file: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._on_run is not None:
            self._on_run(file, feeds)
        session = self._sessions[file]
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, feeds)))

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> dict[str, np.ndarray]:
        """input_ids, attention_mask: [batch, src_len] int64 -> every encoder output by name."""
        session = self._sessions[self._encoder_file]
        feeds = {INPUT_IDS: input_ids, ATTENTION_MASK: attention_mask}
        return self._run(self._encoder_file, {i.name: feeds[i.name] for i in session.get_inputs()})

    def decode(self, encoded: dict[str, np.ndarray], attention_mask: np.ndarray,
               decoder_input_ids: np.ndarray) -> np.ndarray:
        """Feed decoder_input_ids ([batch, tgt_len] int64) one position per step through the cache.

        attention_mask: the encoder's, [batch, src_len] int64. Returns logits [batch, tgt_len, vocab]
        float32: position t's logits come from step t, which saw positions 0..t through the cache.
        """
        m = self.manifest
        states = {name: encoded[output] for name, output in encoder_inits(m.states).items()}
        logits = []
        for position in range(decoder_input_ids.shape[1]):
            file = m.first_step_file if position == 0 and m.first_step_file else m.decoder_file
            session = self._sessions[file]
            declared = {i.name: i for i in session.get_inputs()}
            feeds = {INPUT_IDS: decoder_input_ids[:, position:position + 1]}
            if ENCODER_ATTENTION_MASK in declared:
                feeds[ENCODER_ATTENTION_MASK] = attention_mask
            if ENCODER_HIDDEN_STATES in declared:
                feeds[ENCODER_HIDDEN_STATES] = encoded[LAST_HIDDEN_STATE]
            if m.use_cache_branch:
                feeds[m.use_cache_branch] = np.array([position > 0])
            if LOGITS_ROWS in declared:  # a greedy head: logits for every row (the runtime's tokens check the head)
                feeds[LOGITS_ROWS] = np.array([decoder_input_ids.shape[0]], dtype=np.int64)
                feeds[GREEDY_BIAS] = np.zeros(m.vocab_size or 0, dtype=np.float32)
            if SEQLENS_K in declared:  # buffer states: positions written, and with this one
                feeds[SEQLENS_K] = np.full(decoder_input_ids.shape[0], position, dtype=np.int32)
                feeds[TOTAL_SEQUENCE_LENGTH] = np.array(position + 1, dtype=np.int32)
            for state in m.states:
                if state.input_name in declared:
                    value = states.get(state.input_name)
                    # a buffer holds every position of the call (written in place by the runtime; here
                    # each step's present, a copy, is fed to the next)
                    capacity = decoder_input_ids.shape[1] if state.kind == "buffer" else 0
                    feeds[state.input_name] = value if value is not None else _empty(
                        declared[state.input_name], state.batch_axis, decoder_input_ids.shape[0], capacity)
            outputs = self._run(file, feeds)
            for state in m.states:
                # A fixed state keeps its first value; optimum's merged graph re-emits it every step.
                if state.output_name in outputs and not (state.kind == "fixed" and state.input_name in states):
                    states[state.input_name] = outputs[state.output_name]
            logits.append(outputs[LOGITS][:, -1, :].astype(np.float32))
        return np.stack(logits, axis=1)


def _empty(declared: ort.NodeArg, batch_axis: int, rows: int, length: int = 0) -> np.ndarray:
    """A zero state for step 0: the batch axis is `rows`, every other symbolic axis `length`."""
    shape = [rows if axis == batch_axis else (dim if isinstance(dim, int) else length)
             for axis, dim in enumerate(declared.shape)]
    return np.zeros(shape, dtype=ORT_TYPES[declared.type])
