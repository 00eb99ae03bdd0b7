"""Score given sequences token by token, the way beam search scored them (teacher forcing).

Beam search (beam.py) keeps only each hypothesis' total; a server reporting per-token log-probs for a
beam's answer replays the answer through the decoder once: log_softmax(logits), then the rules, as
beam search applies them, read at each chosen token. The per-token scores sum to the hypothesis'
raw score (its `sequences_scores` times length ** length_penalty).
"""

from __future__ import annotations

import numpy as np

from runtime.search import DecoderStep, LogitsRule


def score_tokens(step: DecoderStep, sequences: np.ndarray, rules: list[LogitsRule],
                 eos_token_ids: tuple[int, ...]) -> np.ndarray:
    """Per-token scores of finished sequences.

    step: a fresh decoder with one row per sequence; sequences: [rows, length] int64, decoder start
    token first, pad after EOS (what beam search returns). Returns [rows, length - 1] float32: the
    score of token t + 1 given tokens 0..t; 0.0 after a row's EOS. Rows that emitted EOS leave the step.
    """
    rows, length = sequences.shape
    scores_out = np.zeros((rows, length - 1), dtype=np.float32)
    eos = np.asarray(eos_token_ids, dtype=np.int64)
    active = np.arange(rows)
    for t in range(length - 1):
        logits = step(sequences[active, t]).astype(np.float32, copy=False)  # [active, vocab]
        log_probs = logits - logits.max(axis=1, keepdims=True)
        log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
        seen = sequences[active, : t + 1]
        for rule in rules:
            rule(seen, log_probs)
        chosen = sequences[active, t + 1]
        scores_out[active, t] = log_probs[np.arange(active.shape[0]), chosen]
        running = ~np.isin(chosen, eos)
        if not running.all():
            if not running.any():
                break
            keep = np.flatnonzero(running)
            step.select(keep)
            active = active[keep]
    return scores_out
