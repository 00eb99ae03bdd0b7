"""Source `custom`, decoder-only models (models/ SimpleDecoderOnly, DecoderOnly): one graph, `decoder.onnx`.

    input_ids        [rows, new_len] int64               the prompt (new_len > 1), then one token per run
    attention_mask   [rows, past_len + new_len] int64    the whole sequence's, padding on the left
    past_key_values.{i}.{self|memory}.{key|value}  [rows, heads, past_len, head_dim]   empty at first
 -> logits           [rows, new_len, vocab] float32
    present.{i}.{self|memory}.{key|value}          [rows, heads, past_len + new_len, head_dim]

Positions come from the mask (real tokens counted from 0), so nothing else is fed. The manifest's
kind is "decoder-only"; its states are the model's `state_specs()` (all `grows` from `empty`).
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
    TRACE_NEW_LEN,
    TRACE_PAST_LEN,
    TRACE_ROWS,
    TRACE_TOKEN,
    finish_with_tokenizer,
    state_axes,
    trace,
)
from models.checkpoint import TOKENIZER_NAME, Checkpoint
from models.decoder_only import TransformerLM
from models.generate import generate_from_prompt
from runtime.manifest import ATTENTION_MASK, DECODER_ONLY, INPUT_IDS, LOGITS, Manifest, fed_back

SAMPLE_PROMPT_LEN, SAMPLE_PADDING = 7, 3  # the sample prompts: [2, 7], the second padded by 3 on the left


class DecoderOnlyStepGraph(nn.Module):
    """input_ids, attention_mask, *states -> logits, *present states, in the order of the names lists."""

    def __init__(self, model: TransformerLM):
        super().__init__()
        self.model = model
        specs = model.state_specs()
        self.state_names = [s.input_name for s in specs]
        self.input_names = [INPUT_IDS, ATTENTION_MASK] + self.state_names
        self.output_names = [LOGITS, *fed_back(specs).values()]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *states: torch.Tensor):
        logits, present = self.model.step(input_ids, attention_mask, dict(zip(self.state_names, states)))
        return (logits,) + tuple(present[name] for name in self.output_names[1:])


class DecoderOnlyReference:
    """The PyTorch side of validation (exporter/validate_kinds.py), numpy in and out."""

    def __init__(self, checkpoint: Checkpoint):
        self.model = cast(TransformerLM, checkpoint.model)  # load_source picked this class by the model's kind
        self.special_tokens = checkpoint.config.special_tokens

    @torch.no_grad()
    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Logits of every position with torch's own modules (no cache): [batch, seq, vocab] float32.
        input_ids, attention_mask: [batch, seq] int64, padding on the left."""
        ids, mask = (torch.from_numpy(np.asarray(a, dtype=np.int64)) for a in (input_ids, attention_mask))
        return self.model.full_forward(ids, mask).numpy()

    def generate(self, prompt_ids: np.ndarray, attention_mask: np.ndarray, max_new_tokens: int) -> np.ndarray:
        """The models/ reference greedy search: [batch, prompt_len + new] int64."""
        tokens = self.special_tokens
        return generate_from_prompt(self.model, torch.from_numpy(np.asarray(prompt_ids, dtype=np.int64)),
                                    torch.from_numpy(np.asarray(attention_mask, dtype=np.int64)),
                                    max_new_tokens=max_new_tokens, eos_token_id=tokens["eos_token_id"],
                                    pad_token_id=tokens["pad_token_id"]).numpy()


class DecoderOnlySource:
    """A loaded decoder-only models/ checkpoint (exporter.sources.Source)."""

    kind = "custom"

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.model = cast(TransformerLM, checkpoint.model)  # load_source picked this class by the model's kind
        self.model_type = checkpoint.config.class_name
        self._manifest: Manifest | None = None

    def export_graphs(self, out_dir: Path, opset: int | None, steps: Steps) -> Manifest:
        steps.start("decoder")
        self._export_decoder(Path(out_dir) / DECODER_FILE, opset or DEFAULT_OPSET)
        tokens = self.checkpoint.config.special_tokens
        self._manifest = Manifest(
            encoder_file=None,
            decoder_file=DECODER_FILE,
            states=self.model.state_specs(),
            eos_token_ids=(tokens["eos_token_id"],),
            pad_token_id=tokens["pad_token_id"],
            decoder_start_token_id=None,
            vocab_size=self.checkpoint.config.args["vocab_size"],
            kind=DECODER_ONLY,
            model_type=self.model_type,
            source=self.kind,
            tokenizer_file=TOKENIZER_NAME if self.checkpoint.tokenizer_file else None,
            generation_defaults=dict(self.checkpoint.config.generation),
        )
        return self._manifest

    def finish(self, out_dir: Path, notes: list[str]) -> Manifest:
        """Copy tokenizer.json beside the graph; the layout is final as exported."""
        return finish_with_tokenizer(self._manifest, self.checkpoint, out_dir)

    def reference(self) -> DecoderOnlyReference:
        return DecoderOnlyReference(self.checkpoint)

    def sample_inputs(self) -> tuple[np.ndarray, np.ndarray]:
        """Two prompts of different lengths, padded on the left: random ids, special tokens avoided."""
        tokens = self.checkpoint.config.special_tokens
        special = set(tokens.values())
        vocab = [i for i in range(self.checkpoint.config.args["vocab_size"]) if i not in special]
        prompt_ids = np.random.default_rng(0).choice(vocab, size=(2, SAMPLE_PROMPT_LEN)).astype(np.int64)
        attention_mask = np.ones_like(prompt_ids)
        attention_mask[1, :SAMPLE_PADDING] = 0
        prompt_ids[1, :SAMPLE_PADDING] = tokens["pad_token_id"]
        return prompt_ids, attention_mask

    def _export_decoder(self, path: Path, opset: int) -> None:
        graph = DecoderOnlyStepGraph(self.model)
        total = TRACE_PAST_LEN + TRACE_NEW_LEN
        mask = torch.ones(TRACE_ROWS, total, dtype=torch.int64)
        mask[1, 0] = 0  # a left-padded row, so masking is traced with a real mask
        with torch.no_grad():  # a non-empty cache to trace with
            _, present = self.model.step(torch.full((TRACE_ROWS, TRACE_PAST_LEN), TRACE_TOKEN),
                                         mask[:, :TRACE_PAST_LEN], self.model.start_states(TRACE_ROWS))
        outputs = fed_back(self.model.state_specs())
        states = tuple(present[outputs[s.input_name]] for s in self.model.state_specs())
        args = (torch.full((TRACE_ROWS, TRACE_NEW_LEN), TRACE_TOKEN, dtype=torch.int64), mask) + states
        axes = {INPUT_IDS: {0: "rows", 1: "new_len"}, ATTENTION_MASK: {0: "rows", 1: "total_len"},
                LOGITS: {0: "rows", 1: "new_len"}}
        for spec in self.model.state_specs():
            axes[spec.input_name] = state_axes(spec, "rows", "past_len")
            axes[outputs[spec.input_name]] = state_axes(spec, "rows", "total_len")
        trace(graph, args, path, graph.input_names, graph.output_names, axes, opset)
