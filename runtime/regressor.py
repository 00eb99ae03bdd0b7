"""Sequence-to-sequence regressors on float features (kind "regressor": models/ SimpleEncoderDecoder).

    model = runtime.load("out/forecaster")                    # runtime.load picks this class from s2s.json
    outputs = model.forward(src, trg)                         # teacher-forced: [batch, tgt_len, output_dim]
    outputs = model.rollout(src, steps=12, start=first_input) # autoregressive: [batch, steps, output_dim]

No tokens: the encoder graph takes `src` [batch, src_len, input_dim] float32 and emits the decoder's
initial states (an LSTM's (h, c)); the decoder graph takes `decoder_inputs` [rows, tgt_len,
decoder_input_dim] and the states, and emits `outputs` [rows, tgt_len, output_dim] and the states
after the last position. Sizes come from the manifest's `features`. Every row of a batch has the same
length (nothing is masked).

`rollout`'s rule for each step's decoder input (models/regressor.py follows the same):
- step 0 reads `start` ([batch, decoder_input_dim] or [decoder_input_dim]; default zeros);
- step t > 0 reads `feedback(outputs of step t - 1)` ([batch, output_dim] float32 -> [batch,
  decoder_input_dim]): by default the outputs themselves, which needs output_dim == decoder_input_dim.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import ExportDirError, InvalidInputError, InvalidOptionError
from runtime.manifest import DECODER_INPUTS, OUTPUTS, SRC, Manifest, encoder_inits, fed_back
from runtime.sessions import Graph, ProviderConfig, resolve_provider

# outputs of one step [batch, output_dim] float32 -> the next step's decoder inputs [batch, decoder_input_dim]
Feedback = Callable[[np.ndarray], np.ndarray]


class RegressorModel:
    """A loaded regressor export. Holds only read-only things: one model serves concurrent calls."""

    def __init__(self, export_dir: Path, manifest: Manifest, provider: str = "auto", threads: int | None = None,
                 io_binding: bool | None = None):
        if threads is not None and threads < 1:
            raise InvalidOptionError(f"threads={threads}: must be >= 1 (or None for onnxruntime's default)")
        if manifest.features is None or manifest.encoder_file is None:
            raise ExportDirError(f"{str(export_dir)!r} holds a {manifest.kind} model, not a regressor: "
                                 "load it with runtime.load")
        self.export_dir = export_dir
        self.manifest = manifest
        if io_binding:
            raise InvalidOptionError("io_binding=True: regressors run without IO binding (the caller reads every "
                                     "output anyway); pass None or False")
        self.features = manifest.features
        self._inits = encoder_inits(manifest.states)  # state input -> encoder output
        self._outputs = fed_back(manifest.states)  # state input -> decoder output
        self.requested_provider = provider
        self.provider, self.provider_reason = resolve_provider(provider)
        self.config = ProviderConfig(self.provider, threads, io_binding=False)
        manifest.check_shared_weights(export_dir)
        self.encoder = Graph(export_dir / manifest.encoder_file, self.config, spinning=False)
        self.decoder = Graph(export_dir / manifest.decoder_file, self.config)
        self._check_io()

    def __reduce__(self):  # ship to another process as its directory, rebuilt there
        from runtime.model import load

        return (load, (self.export_dir, self.requested_provider, self.config.threads, None))

    def _check_io(self) -> None:
        states = self.manifest.states
        wanted = ((self.encoder, "input", [SRC]), (self.encoder, "output", list(self._inits.values())),
                  (self.decoder, "input", [DECODER_INPUTS] + [s.input_name for s in states]),
                  (self.decoder, "output", [OUTPUTS] + list(self._outputs.values())))
        for graph, where, names in wanted:
            missing = [n for n in names if n not in (graph.inputs if where == "input" else graph.outputs)]
            if missing:
                raise ExportDirError(f"{graph.name} lacks {where}(s) {missing} that s2s.json names; the directory is "
                                     "inconsistent with its s2s.json, re-export the model")
        self.manifest.check_feedable(self.encoder.name, self.encoder.inputs, "encoder")
        self.manifest.check_feedable(self.decoder.name, self.decoder.inputs, "decoder")

    def forward(self, src: Any, trg: Any) -> np.ndarray:
        """Teacher-forced: src [batch, src_len, input_dim], trg [batch, tgt_len, decoder_input_dim] float
        -> outputs [batch, tgt_len, output_dim] float32 (the plain model's `forward(src, trg)`).

        Raises:
            InvalidInputError: arrays of the wrong rank, sizes or batch, empty, or not finite.
        """
        src = self._features(src, "src", self.features.input_dim)
        trg = self._features(trg, "trg", self.features.decoder_input_dim)
        if trg.shape[0] != src.shape[0]:
            raise InvalidInputError(f"trg has {trg.shape[0]} rows, src {src.shape[0]}: give one target per source")
        outputs, _ = self._decode(trg, self._encode(src))
        return outputs

    def rollout(self, src: Any, steps: int, start: Any = None, feedback: Feedback | None = None) -> np.ndarray:
        """Autoregressive, without a target: src [batch, src_len, input_dim] float; steps: outputs to make;
        start: the first decoder input, [batch, decoder_input_dim] or [decoder_input_dim] (default zeros);
        feedback: the next decoder input from an output (default: the output itself; see module docstring).
        Returns [batch, steps, output_dim] float32.

        Raises:
            InvalidOptionError: steps < 1, or output_dim != decoder_input_dim without a feedback.
            InvalidInputError: bad src or start, or a feedback returning the wrong shape.
        """
        f = self.features
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
            raise InvalidOptionError(f"steps={steps!r}: expected an integer >= 1")
        if feedback is None and f.output_dim != f.decoder_input_dim:
            raise InvalidOptionError(f"the outputs ({f.output_dim} features) cannot be fed back as decoder inputs "
                                     f"({f.decoder_input_dim} features): pass feedback=, a function from outputs "
                                     f"[batch, {f.output_dim}] to inputs [batch, {f.decoder_input_dim}]")
        src = self._features(src, "src", f.input_dim)
        batch = src.shape[0]
        decoder_input = np.zeros((batch, f.decoder_input_dim), dtype=np.float32) if start is None else \
            self._start(start, batch)
        states = self._encode(src)
        outputs = np.empty((batch, steps, f.output_dim), dtype=np.float32)
        for t in range(steps):
            output, states = self._decode(decoder_input[:, None, :], states)
            outputs[:, t] = output[:, 0]
            if t + 1 < steps:
                decoder_input = outputs[:, t] if feedback is None else \
                    self._fed_back(feedback(outputs[:, t].copy()), batch)
        return outputs

    # -- graphs -------------------------------------------------------------------------------------
    def _encode(self, src: np.ndarray) -> dict[str, np.ndarray]:
        """The decoder's initial states, by state input name."""
        results = self.encoder.run({SRC: src}, self._inits.values())
        return {name: results[output] for name, output in self._inits.items()}

    def _decode(self, decoder_inputs: np.ndarray,
                states: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """decoder_inputs: [batch, n, decoder_input_dim] float32 -> outputs [batch, n, output_dim] float32
        and the states after the last position."""
        names = [OUTPUTS, *self._outputs.values()]
        dtype = self.decoder.inputs[DECODER_INPUTS].dtype
        results = self.decoder.run({DECODER_INPUTS: decoder_inputs.astype(dtype, copy=False), **states}, names)
        return (results[OUTPUTS].astype(np.float32, copy=False),
                {name: results[output] for name, output in self._outputs.items()})

    # -- input checks --------------------------------------------------------------------------------
    def _features(self, value: Any, name: str, dim: int) -> np.ndarray:
        array = np.asarray(value)
        if array.ndim != 3 or array.shape[2] != dim or not np.issubdtype(array.dtype, np.number):
            raise InvalidInputError(f"{name} must be a numeric array [batch, length, {dim}], got shape {array.shape} "
                                    f"dtype {array.dtype}")
        if array.shape[0] == 0 or array.shape[1] == 0:
            raise InvalidInputError(f"{name} is empty (shape {array.shape}); give at least one row and position")
        if not np.isfinite(array).all():
            raise InvalidInputError(f"{name} holds NaN or infinite values")
        return array.astype(self.encoder.inputs[SRC].dtype if name == "src" else np.float32, copy=False)

    def _start(self, start: Any, batch: int) -> np.ndarray:
        dim = self.features.decoder_input_dim
        array = np.asarray(start, dtype=np.float32)
        if array.shape == (dim,):
            array = np.broadcast_to(array, (batch, dim))
        if array.shape != (batch, dim) or not np.isfinite(array).all():
            raise InvalidInputError(f"start must be finite, of shape [{dim}] or [{batch}, {dim}], got {array.shape}")
        return array

    def _fed_back(self, value: Any, batch: int) -> np.ndarray:
        array = np.asarray(value, dtype=np.float32)
        dim = self.features.decoder_input_dim
        if array.shape != (batch, dim):
            raise InvalidInputError(f"feedback returned shape {array.shape}; expected [{batch}, {dim}] (the next "
                                    "decoder inputs)")
        return array
