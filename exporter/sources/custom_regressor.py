"""Source `custom`, the regressor (models/ SimpleEncoderDecoder): float features, no tokens.

    encoder.onnx   src [batch, src_len, input_dim] float32
                -> last_hidden_state [batch, src_len, hidden_dim], present.h / present.c [1, batch, hidden_dim]
    decoder.onnx   decoder_inputs [rows, tgt_len, hidden_dim], past.h / past.c [1, rows, hidden_dim]
                -> outputs [rows, tgt_len, output_dim], present.h / present.c (after the last position)

The decoder takes any number of positions: the whole target at once (teacher forcing) or one per run
(rollout). The manifest's kind is "regressor", with `features` giving the three sizes; (h, c) are
recurrent states from the encoder, as for the LSTM encoder-decoders.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import nn

from exporter.progress import Steps
from exporter.sources.tracing import (
    DECODER_FILE,
    DEFAULT_OPSET,
    ENCODER_FILE,
    TRACE_NEW_LEN,
    TRACE_ROWS,
    TRACE_SRC_LEN,
    state_axes,
    trace,
)
from models.checkpoint import Checkpoint
from models.regressor import SimpleEncoderDecoder
from runtime.manifest import (
    DECODER_INPUTS,
    LAST_HIDDEN_STATE,
    OUTPUTS,
    REGRESSOR,
    SRC,
    FloatFeatures,
    Manifest,
    encoder_inits,
    fed_back,
)

SAMPLE_SRC_LEN, SAMPLE_TGT_LEN = 7, 5


class RegressorEncoderGraph(nn.Module):
    def __init__(self, model: SimpleEncoderDecoder):
        super().__init__()
        self.model = model
        self.output_names = [LAST_HIDDEN_STATE, *encoder_inits(model.state_specs()).values()]

    def forward(self, src: torch.Tensor) -> tuple[torch.Tensor, ...]:
        encoded = self.model.encode(src)
        return tuple(encoded[name] for name in self.output_names)


class RegressorDecoderGraph(nn.Module):
    def __init__(self, model: SimpleEncoderDecoder):
        super().__init__()
        self.model = model
        specs = model.state_specs()
        self.state_names = [s.input_name for s in specs]
        self.input_names = [DECODER_INPUTS] + self.state_names
        self.output_names = [OUTPUTS, *fed_back(specs).values()]

    def forward(self, decoder_inputs: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs, present = self.model.step(decoder_inputs, dict(zip(self.state_names, states)))
        return (outputs,) + tuple(present[name] for name in self.output_names[1:])


class RegressorReference:
    """The PyTorch side of validation (exporter/validate_kinds.py), numpy in and out, float32."""

    def __init__(self, checkpoint: Checkpoint):
        self.model = cast(SimpleEncoderDecoder, checkpoint.model)  # load_source picked this class by the model's kind

    @torch.no_grad()
    def encode(self, src: np.ndarray) -> np.ndarray:
        """src [batch, src_len, input_dim] -> the encoder's last_hidden_state [batch, src_len, hidden_dim]."""
        return self.model.encode(torch.from_numpy(src))[LAST_HIDDEN_STATE].numpy()

    @torch.no_grad()
    def forward(self, src: np.ndarray, trg: np.ndarray) -> np.ndarray:
        """Teacher-forced outputs [batch, tgt_len, output_dim]."""
        return self.model(torch.from_numpy(src), torch.from_numpy(trg)).numpy()

    def rollout(self, src: np.ndarray, steps: int, start: np.ndarray, projection: np.ndarray | None) -> np.ndarray:
        """models/'s rollout from `start` ([hidden_dim]), feeding back each output, times `projection`
        ([output_dim, hidden_dim]) if given. Returns [batch, steps, output_dim]."""
        feedback = None if projection is None else (lambda output: output @ torch.from_numpy(projection))
        return self.model.rollout(torch.from_numpy(src), steps, start=torch.from_numpy(start),
                                  feedback=feedback).numpy()


class RegressorSource:
    """A loaded SimpleEncoderDecoder checkpoint (exporter.sources.Source)."""

    kind = "custom"

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.model = cast(SimpleEncoderDecoder, checkpoint.model)  # load_source picked this class by the model's kind
        self.model_type = checkpoint.config.class_name
        self._manifest: Manifest | None = None

    def export_graphs(self, out_dir: Path, opset: int | None, steps: Steps) -> Manifest:
        out_dir, opset = Path(out_dir), opset or DEFAULT_OPSET
        steps.start("encoder")
        self._export_encoder(out_dir / ENCODER_FILE, opset)
        steps.start("decoder")
        self._export_decoder(out_dir / DECODER_FILE, opset)
        self._manifest = Manifest(
            encoder_file=ENCODER_FILE,
            decoder_file=DECODER_FILE,
            states=self.model.state_specs(),
            eos_token_ids=(),
            pad_token_id=None,
            decoder_start_token_id=None,
            vocab_size=None,
            kind=REGRESSOR,
            features=FloatFeatures(self.model.input_dim, self.model.hidden_dim, self.model.output_dim),
            model_type=self.model_type,
            source=self.kind,
        )
        return self._manifest

    def finish(self, out_dir: Path, notes: list[str]) -> Manifest:
        """Nothing to add: no tokenizer, no generation defaults."""
        if self._manifest is None:
            raise RuntimeError("finish() before export_graphs()")
        return self._manifest

    def reference(self) -> RegressorReference:
        return RegressorReference(self.checkpoint)

    def sample_inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """src [2, 7, input_dim] and trg [2, 5, hidden_dim] float32, standard normal (seeded)."""
        rng = np.random.default_rng(0)
        src = rng.standard_normal((2, SAMPLE_SRC_LEN, self.model.input_dim)).astype(np.float32)
        trg = rng.standard_normal((2, SAMPLE_TGT_LEN, self.model.hidden_dim)).astype(np.float32)
        return src, trg

    def _export_encoder(self, path: Path, opset: int) -> None:
        graph = RegressorEncoderGraph(self.model)
        src = torch.zeros(TRACE_ROWS, TRACE_SRC_LEN, self.model.input_dim)
        axes = {SRC: {0: "batch", 1: "src_len"}, LAST_HIDDEN_STATE: {0: "batch", 1: "src_len"}}
        inits = encoder_inits(self.model.state_specs())
        axes.update({inits[s.input_name]: state_axes(s, "batch", "src_len") for s in self.model.state_specs()})
        trace(graph, (src,), path, [SRC], graph.output_names, axes, opset)

    def _export_decoder(self, path: Path, opset: int) -> None:
        graph = RegressorDecoderGraph(self.model)
        with torch.no_grad():
            states = self.model.start_states(self.model.encode(torch.zeros(TRACE_ROWS, TRACE_SRC_LEN,
                                                                           self.model.input_dim)))
        args = (torch.zeros(TRACE_ROWS, TRACE_NEW_LEN, self.model.hidden_dim),) + \
            tuple(states[name] for name in graph.state_names)
        axes = {DECODER_INPUTS: {0: "rows", 1: "tgt_len"}, OUTPUTS: {0: "rows", 1: "tgt_len"}}
        outputs = fed_back(self.model.state_specs())
        for spec in self.model.state_specs():  # (h, c): [1, rows, hidden_dim]
            axes[spec.input_name] = axes[outputs[spec.input_name]] = {spec.batch_axis: "rows"}
        trace(graph, args, path, graph.input_names, graph.output_names, axes, opset)
