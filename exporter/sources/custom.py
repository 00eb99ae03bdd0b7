"""Source `custom`: a models/ checkpoint directory (s2s_model.json, see models/checkpoint.py).

`load_source` picks the source by the model's `kind`: the encoder-decoders here, the decoder-only
models in custom_decoder_only.py, the regressor in custom_regressor.py.

An encoder-decoder is exported through torch.onnx (the TorchScript tracer, as optimum does) into the
same contract as the HF exports, from two thin wrappers over the model's generation interface:
- `encoder.onnx`: input_ids, attention_mask [batch, src_len] int64 -> last_hidden_state and the
  initial value of every state the encoder gives (cross-attention K/V of each decoder layer, computed
  once here; an LSTM's (h, c));
- `decoder.onnx`: the cached step only. input_ids [rows, 1] int64, the encoder tensors the step reads
  (`encoder_attention_mask`, and `encoder_hidden_states` for the LSTM with attention), the state
  inputs -> logits [rows, 1, vocab] float32 and the updated states. A transformer's self-attention
  cache starts empty (past_len 0) and its length is the position: nothing else is fed.
The manifest's states come from the model's own `state_specs()`: no code here per architecture.
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
    TRACE_PAST_LEN,
    TRACE_ROWS,
    TRACE_SRC_LEN,
    TRACE_TOKEN,
    finish_with_tokenizer,
    state_axes,
    trace,
)
from models import Seq2SeqModel
from models.checkpoint import TOKENIZER_NAME, Checkpoint, load_checkpoint
from models.generate import generate
from runtime.manifest import (
    ATTENTION_MASK,
    DECODER_ONLY,
    ENCODER_ATTENTION_MASK,
    ENCODER_HIDDEN_STATES,
    INPUT_IDS,
    LAST_HIDDEN_STATE,
    LOGITS,
    REGRESSOR,
    Manifest,
    encoder_inits,
)


def load_source(model_dir: Path):
    """The source of a models/ checkpoint, by its model's kind (exporter.sources.Source).

    Raises CheckpointError or UnsupportedModelError (both S2SError) for a bad checkpoint.
    """
    checkpoint = load_checkpoint(model_dir)
    if checkpoint.model.kind == DECODER_ONLY:
        from exporter.sources.custom_decoder_only import DecoderOnlySource

        return DecoderOnlySource(checkpoint)
    if checkpoint.model.kind == REGRESSOR:
        from exporter.sources.custom_regressor import RegressorSource

        return RegressorSource(checkpoint)
    return CustomSource(checkpoint)


class EncoderGraph(nn.Module):
    """input_ids, attention_mask -> (last_hidden_state, *state initial values), as `output_names` lists them."""

    def __init__(self, model: Seq2SeqModel):
        super().__init__()
        self.model = model
        self.output_names = [LAST_HIDDEN_STATE, *encoder_inits(model.state_specs()).values()]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        encoded = self.model.encode(input_ids, attention_mask)
        return tuple(encoded[name] for name in self.output_names)


class DecoderStepGraph(nn.Module):
    """The cached step with flat inputs and outputs, in the order of `input_names` / `output_names`."""

    def __init__(self, model: Seq2SeqModel):
        super().__init__()
        self.model = model
        specs = model.state_specs()
        self.encoder_input_names = list(model.step_inputs)
        self.state_names = [s.input_name for s in specs]
        self.input_names = [INPUT_IDS] + self.encoder_input_names + self.state_names
        self.output_names = [LOGITS] + [s.output_name for s in specs if s.output_name is not None]

    def forward(self, input_ids: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        count = len(self.encoder_input_names)
        encoder_inputs = dict(zip(self.encoder_input_names, inputs[:count]))
        states = dict(zip(self.state_names, inputs[count:]))
        logits, present = self.model.step(input_ids, encoder_inputs, states)
        return (logits,) + tuple(present[name] for name in self.output_names[1:])


class CustomReference:
    """The PyTorch side of validation (exporter.sources.TorchReference), numpy in and out."""

    def __init__(self, checkpoint: Checkpoint):
        self.model = cast(Seq2SeqModel, checkpoint.model)  # load_source picked this class by the model's kind
        self.special_tokens = checkpoint.config.special_tokens

    @torch.no_grad()
    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray,
                decoder_input_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Teacher-forced with torch's own modules (no cache): last_hidden_state and logits, float32."""
        ids, mask, dec = (torch.from_numpy(np.asarray(a, dtype=np.int64)) for a in
                          (input_ids, attention_mask, decoder_input_ids))
        hidden = self.model.encode(ids, mask)[LAST_HIDDEN_STATE]
        return hidden.numpy(), self.model.full_forward(ids, mask, dec).numpy()

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int) -> np.ndarray:
        """The models/ reference greedy search."""
        tokens = self.special_tokens
        return generate(self.model, torch.from_numpy(np.asarray(input_ids, dtype=np.int64)),
                        torch.from_numpy(np.asarray(attention_mask, dtype=np.int64)), max_new_tokens=max_new_tokens,
                        decoder_start_token_id=tokens["decoder_start_token_id"], eos_token_id=tokens["eos_token_id"],
                        pad_token_id=tokens["pad_token_id"]).numpy()


class CustomSource:
    """A loaded models/ checkpoint (exporter.sources.Source)."""

    kind = "custom"

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.model = cast(Seq2SeqModel, checkpoint.model)  # load_source picked this class by the model's kind
        self.model_type = checkpoint.config.class_name
        self._manifest: Manifest | None = None

    def export_graphs(self, out_dir: Path, opset: int | None, steps: Steps) -> Manifest:
        out_dir = Path(out_dir)
        opset = opset or DEFAULT_OPSET
        steps.start("encoder")
        self._export_encoder(out_dir / ENCODER_FILE, opset)
        steps.start("decoder")
        self._export_decoder(out_dir / DECODER_FILE, opset)
        tokens = self.checkpoint.config.special_tokens
        self._manifest = Manifest(
            encoder_file=ENCODER_FILE,
            decoder_file=DECODER_FILE,
            states=self.model.state_specs(),
            eos_token_ids=(tokens["eos_token_id"],),
            pad_token_id=tokens["pad_token_id"],
            decoder_start_token_id=tokens["decoder_start_token_id"],
            vocab_size=self.checkpoint.config.args["vocab_size"],
            model_type=self.model_type,
            source=self.kind,
            tokenizer_file=TOKENIZER_NAME if self.checkpoint.tokenizer_file else None,
            generation_defaults=dict(self.checkpoint.config.generation),
        )
        return self._manifest

    def finish(self, out_dir: Path, notes: list[str]) -> Manifest:
        """Copy tokenizer.json beside the graphs; the layout is final as exported."""
        return finish_with_tokenizer(self._manifest, self.checkpoint, out_dir)

    def reference(self) -> CustomReference:
        return CustomReference(self.checkpoint)

    def sample_inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """Two inputs of different lengths, padded on the right: random ids, special tokens avoided."""
        special = set(self.checkpoint.config.special_tokens.values())
        vocab = [i for i in range(self.checkpoint.config.args["vocab_size"]) if i not in special]
        rng = np.random.default_rng(0)
        input_ids = rng.choice(vocab, size=(2, 7)).astype(np.int64)
        attention_mask = np.ones_like(input_ids)
        attention_mask[1, 4:] = 0
        input_ids[1, 4:] = self.checkpoint.config.special_tokens["pad_token_id"]
        return input_ids, attention_mask

    # -- tracing ----------------------------------------------------------------------------------------
    def _export_encoder(self, path: Path, opset: int) -> None:
        graph = EncoderGraph(self.model)
        input_ids = torch.full((TRACE_ROWS, TRACE_SRC_LEN), TRACE_TOKEN, dtype=torch.int64)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[1, -1] = 0  # a padded row, so masking is traced with a real mask
        axes = {INPUT_IDS: {0: "batch", 1: "src_len"}, ATTENTION_MASK: {0: "batch", 1: "src_len"},
                LAST_HIDDEN_STATE: {0: "batch", 1: "src_len"}}
        for spec in self.model.state_specs():
            if spec.init == "encoder" and spec.encoder_output is not None:
                axes[spec.encoder_output] = state_axes(spec, "batch", "src_len")
        trace(graph, (input_ids, attention_mask), path, [INPUT_IDS, ATTENTION_MASK], graph.output_names,
               axes, opset)

    def _export_decoder(self, path: Path, opset: int) -> None:
        graph = DecoderStepGraph(self.model)
        ids = torch.full((TRACE_ROWS, TRACE_SRC_LEN), TRACE_TOKEN, dtype=torch.int64)
        mask = torch.ones_like(ids)
        mask[1, -1] = 0
        with torch.no_grad():
            encoded = self.model.encode(ids, mask)
            states = self.model.start_states(encoded)
            encoder_inputs = {ENCODER_ATTENTION_MASK: mask, ENCODER_HIDDEN_STATES: encoded[LAST_HIDDEN_STATE]}
            for _ in range(TRACE_PAST_LEN):  # a non-empty self-attention cache to trace with
                _, present = self.model.step(torch.full((TRACE_ROWS, 1), TRACE_TOKEN), encoder_inputs, states)
                states.update({s.input_name: present[s.output_name] for s in self.model.state_specs()
                               if s.output_name is not None})
        args = (torch.full((TRACE_ROWS, 1), TRACE_TOKEN, dtype=torch.int64),) + \
            tuple(encoder_inputs[name] for name in graph.encoder_input_names) + \
            tuple(states[name] for name in graph.state_names)
        axes = {INPUT_IDS: {0: "rows"}, ENCODER_ATTENTION_MASK: {0: "rows", 1: "src_len"},
                ENCODER_HIDDEN_STATES: {0: "rows", 1: "src_len"}, LOGITS: {0: "rows"}}
        for spec in self.model.state_specs():
            grown = "past_len" if spec.kind == "grows" else "src_len"
            axes[spec.input_name] = state_axes(spec, "rows", grown)
            if spec.output_name is not None:
                axes[spec.output_name] = state_axes(spec, "rows", "present_len")
        axes = {name: value for name, value in axes.items() if name in graph.input_names + graph.output_names}
        trace(graph, args, path, graph.input_names, graph.output_names, axes, opset)
