"""SimpleEncoderDecoder: an LSTM sequence-to-sequence regressor on float features (no tokens, no embedding).

    encoder = nn.LSTM(input_dim, hidden_dim)    src [batch, src_len, input_dim] -> final (h, c)
    decoder = nn.LSTM(hidden_dim, hidden_dim)   trg [batch, tgt_len, hidden_dim], started from (h, c)
    fc_out  = nn.Linear(hidden_dim, output_dim) -> [batch, tgt_len, output_dim]

Forecasting or signal mapping: the plain version's constructor, parameter names and math exactly
(batch-first, the encoder's outputs unused), so its state_dict loads with strict=True and `forward`
computes what it computed. Every row of a batch has the same length (there is no padding to mask).

Generating without a target (`rollout`) needs a rule for each step's decoder input, which the plain
version leaves open; the rule here:
- step 0 reads `start` ([batch, hidden_dim], default zeros: the model has no learned start vector);
- step t > 0 reads `feedback(output of step t - 1)`: by default the output itself, which needs
  output_dim == hidden_dim; otherwise the caller passes a projection to hidden_dim.
The runtime's `rollout` follows the same rule (runtime/regressor.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from runtime.manifest import LAST_HIDDEN_STATE, REGRESSOR, StateTensor, encoder_inits, fed_back

# outputs of one step [batch, output_dim] -> the next step's decoder input [batch, hidden_dim]
Feedback = Callable[[torch.Tensor], torch.Tensor]


class SimpleEncoderDecoder(nn.Module):
    kind = REGRESSOR  # the export directory's kind (runtime/manifest.py)
    special_tokens: tuple[str, ...] = ()  # no tokens: s2s_model.json has "class" and "args" only

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int):
        super().__init__()
        self.input_dim, self.hidden_dim, self.output_dim = input_dim, hidden_dim, output_dim
        self.encoder = nn.LSTM(input_dim, hidden_dim, batch_first=True)
        self.decoder = nn.LSTM(hidden_dim, hidden_dim, batch_first=True)
        self.fc_out = nn.Linear(hidden_dim, output_dim)

    def forward(self, src: torch.Tensor, trg: torch.Tensor) -> torch.Tensor:
        """The plain call, teacher-forced: src [batch, src_len, input_dim], trg [batch, tgt_len, hidden_dim]
        float32 -> [batch, tgt_len, output_dim]."""
        encoded = self.encode(src)
        outputs, _ = self.step(trg, self.start_states(encoded))
        return outputs

    # -- the cached path -----------------------------------------------------------------------------
    def state_specs(self) -> tuple[StateTensor, ...]:
        """(h, c) of the decoder LSTM: [layers=1, batch, hidden_dim], started from the encoder's final (h, c)."""
        return tuple(StateTensor(f"past.{name}", f"present.{name}", batch_axis=1, seq_axis=None, kind="recurrent",
                                 init="encoder", encoder_output=f"present.{name}") for name in ("h", "c"))

    def encode(self, src: torch.Tensor) -> dict[str, torch.Tensor]:
        """src: [batch, src_len, input_dim] float32 -> {"last_hidden_state": [batch, src_len, hidden_dim],
        "present.h"/"present.c": [1, batch, hidden_dim]}."""
        output, (h, c) = self.encoder(src)
        return {LAST_HIDDEN_STATE: output, "present.h": h, "present.c": c}

    def start_states(self, encoded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: encoded[output] for name, output in encoder_inits(self.state_specs()).items()}

    def step(self, decoder_inputs: torch.Tensor,
             states: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """decoder_inputs: [rows, n, hidden_dim] float32 (n >= 1 positions); states: {"past.h", "past.c"}:
        [1, rows, hidden_dim]. Returns outputs [rows, n, output_dim] and {"present.h", "present.c"}."""
        output, (h, c) = self.decoder(decoder_inputs, (states["past.h"], states["past.c"]))
        return self.fc_out(output), {"present.h": h, "present.c": c}

    @torch.no_grad()
    def rollout(self, src: torch.Tensor, steps: int, start: torch.Tensor | None = None,
                feedback: Feedback | None = None) -> torch.Tensor:
        """Autoregressive outputs without a target: the reference of the runtime's `rollout`.

        src: [batch, src_len, input_dim] float32; start: [batch, hidden_dim] (or [hidden_dim]) float32,
        the first decoder input (default zeros); feedback: the next decoder input from an output (default:
        the output itself). Returns [batch, steps, output_dim] float32.

        Raises:
            ValueError: output_dim != hidden_dim and no feedback given, or steps < 1.
        """
        if steps < 1:
            raise ValueError(f"steps={steps}: must be >= 1")
        if feedback is None:
            if self.output_dim != self.hidden_dim:
                raise ValueError(f"output_dim={self.output_dim} differs from hidden_dim={self.hidden_dim}: pass a "
                                 "feedback that maps an output to the next decoder input")
            feedback = _same
        states = self.start_states(self.encode(src))
        decoder_input = torch.zeros(src.shape[0], self.hidden_dim) if start is None else \
            start.expand(src.shape[0], self.hidden_dim)
        outputs = []
        for _ in range(steps):
            output, present = self.step(decoder_input[:, None, :], states)
            states = {name: present[output] for name, output in fed_back(self.state_specs()).items()}
            outputs.append(output[:, 0])
            decoder_input = feedback(output[:, 0])
        return torch.stack(outputs, dim=1)


def _same(output: torch.Tensor) -> torch.Tensor:
    return output
