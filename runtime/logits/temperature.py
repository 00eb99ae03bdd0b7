"""Temperature: transformers' TemperatureLogitsWarper (sampling only)."""

from __future__ import annotations

import numpy as np

from runtime.logits.checks import require_positive_float


class Temperature:
    """Divide the scores by the temperature: < 1 sharpens the distribution, > 1 flattens it."""

    def __init__(self, temperature: float):
        self.temperature = require_positive_float("temperature", temperature, " (1.0 leaves scores unchanged)")

    def __call__(self, sequences: np.ndarray, scores: np.ndarray) -> None:
        """sequences: [rows, cur_len] int64 (unused); scores: [rows, vocab] float32, edited in place."""
        scores /= self.temperature
