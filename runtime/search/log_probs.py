"""Log-probabilities of a step's logits, and a beam step's ranking of them, for beam search.

A step that can compute them where its logits live offers `log_probs(input_ids)` and
`beam_candidates(input_ids, scores, bans, keep)` (runtime/decoder.py's CachedDecoder does, through
onnxruntime graphs: on CUDA the logits never leave the device, and on the CPU only each input's `keep`
candidates reach numpy). `scoring_step` gives any other `DecoderStep` (one that returns host logits,
like the test suite's torch-backed step) the same two methods in numpy (`rank_candidates`), so beam
search has one code path.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from runtime.search import Candidates, DecoderStep, Shared

# Block size of the top-k prefilter over wide rows (num_beams * vocab scores).
_TOP_K_BLOCK = 256
# Rows up to this wide are ranked by one stable sort.
_SORT_WIDTH = 256


class ScoringStep(DecoderStep, Protocol):
    def log_probs(self, input_ids: np.ndarray) -> np.ndarray:
        """Run one step; input_ids: [rows] int64 -> log_softmax(logits), [rows, vocab] float32 (editable)."""

    def beam_candidates(self, input_ids: np.ndarray, scores: np.ndarray, bans: tuple[int, ...], keep: int,
                        eos: tuple[int, ...]) -> Candidates:
        """Run one step and rank its continuations as `rank_candidates` does from each row's
        min(keep + len(bans), vocab) best log-probs. input_ids: [rows] int64; scores: [n, num_beams]
        float32, each row's running score (rows = n * num_beams); bans: ids at -inf in every row; eos:
        the ids that stop a candidate. The arrays returned may be written over by the next step."""


def scoring_step(step: DecoderStep) -> ScoringStep:
    """`step` itself when it computes log-probs on its own, else a numpy wrapper around it."""
    if hasattr(step, "log_probs") and hasattr(step, "beam_candidates"):
        return step  # type: ignore[return-value]
    return _HostScoring(step)


class _HostScoring:
    def __init__(self, step: DecoderStep):
        self._step = step

    def __call__(self, input_ids: np.ndarray) -> np.ndarray:
        return self._step(input_ids)

    def select(self, rows: np.ndarray, shared: Shared | None = None) -> None:
        self._step.select(rows, shared)

    def log_probs(self, input_ids: np.ndarray) -> np.ndarray:
        return log_softmax(self._step(input_ids))

    def beam_candidates(self, input_ids: np.ndarray, scores: np.ndarray, bans: tuple[int, ...], keep: int,
                        eos: tuple[int, ...]) -> Candidates:
        log_probs = log_softmax(self._step(input_ids))
        ids = top_k_indices(log_probs, min(keep + len(bans), log_probs.shape[1]))
        return rank_candidates(np.take_along_axis(log_probs, ids, axis=1), ids, scores, bans, keep, eos)


def rank_candidates(log_probs: np.ndarray, ids: np.ndarray | None, scores: np.ndarray, bans: tuple[int, ...],
                    keep: int, eos: tuple[int, ...]) -> Candidates:
    """A beam step's ranking (runtime/search/beam.py, part 1): each continuation's total score, and
    each input's `keep` best of them.

    log_probs: [rows, width] float32, edited in place; ids: [rows, width] int64, the token of each
    column (None: column j is token j); scores: [n, num_beams] float32, each row's running score
    (rows = n * num_beams, input-major); bans: token ids set to -inf in every row (with ids only).
    eos: the ids that stop a candidate.
    Returns candidate scores [n, keep] float32, their beams and token ids [n, keep] int64, best first,
    equal scores in position order (beam, then column), as `top_k_indices` ranks them, and which stop.
    runtime/graphs' beam_candidates graph does the same float32 operations in the same order.
    """
    n, num_beams = scores.shape
    rows, width = log_probs.shape
    if bans:
        assert ids is not None, "bans apply to ranked columns"
        log_probs[ids == bans[0] if len(bans) == 1 else np.isin(ids, bans)] = -np.inf
    log_probs += scores.reshape(rows, 1)  # now each continuation's total score
    totals = log_probs.reshape(n, num_beams * width)
    best = top_k_indices(totals, keep)  # [n, keep]
    beams, columns = np.divmod(best, width)
    item = np.arange(n)[:, None]
    token_ids = columns if ids is None else ids.reshape(n, -1)[item, best]
    # one EOS id (the usual case): a plain compare, cheaper than np.isin each step
    stops = token_ids == eos[0] if len(eos) == 1 else np.isin(token_ids, eos)
    return Candidates(totals[item, best], beams, token_ids, stops, int(np.count_nonzero(stops)))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """logits: [rows, vocab] float -> [rows, vocab] float32 log-probs (a new array rules may edit)."""
    logits = logits.astype(np.float32, copy=False)
    log_probs = logits - logits.max(axis=1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(axis=1, keepdims=True))
    return log_probs


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest scores per row, largest first: scores [n, m] float32 -> [n, k] int64.

    Like torch.topk(sorted=True), which transformers uses, NaN included: it ranks above every number
    (a banned +inf score becomes NaN, runtime/logits/bad_words.py). Equal scores among the chosen k
    come out lowest index first; which of several scores equal to the k-th largest get in is
    unspecified (rows up to 256 wide: the lowest indices).
    torch.topk's order of equal scores is unspecified too (its CPU kernel does not keep index
    order), so at an exact tie the two may differ. Exact ties arise between identical
    beams (the first step's copies) and between -1e9/-inf masked candidates, where the pick does
    not reach the returned tokens unless an input ends with fewer than num_beams real hypotheses
    (forced tokens with max_new_tokens=1, a forced BOS that is an EOS), whose other slots are
    -1e9-scored filler in transformers too; between distinct live candidates only by float32
    coincidence.
    """
    width = scores.shape[1]
    if width <= _SORT_WIDTH:
        # Narrow rows (a beam step's candidates, its running beams): one sort, two numpy calls instead
        # of the partition's five, which counts between decoder runs.
        return _ranked(scores, k)
    candidates = scores
    columns = None  # candidates' column in scores, when candidates is a subset
    if width > k * _TOP_K_BLOCK:
        # Wide rows (num_beams * vocab): the k largest lie in the k blocks with the largest maxima
        # (up to which of several equal maxima is taken), so only those blocks are ranked: one
        # pass over the row instead of a partition of it (~10x faster at 4 x 32k). The last block
        # runs to the end of the row; its columns past the last full block are always ranked.
        full_width = width - width % _TOP_K_BLOCK
        block_max = np.maximum.reduceat(scores, np.arange(0, full_width, _TOP_K_BLOCK), axis=1)
        best_blocks = np.argpartition(block_max, -k, axis=1)[:, -k:]  # [n, k]
        rows = len(scores)
        in_blocks = (best_blocks[:, :, None] * _TOP_K_BLOCK + np.arange(_TOP_K_BLOCK)).reshape(rows, -1)
        tail = np.broadcast_to(np.arange(full_width, width), (rows, width - full_width))
        columns = np.concatenate((in_blocks, tail), axis=1)
        candidates = np.take_along_axis(scores, columns, axis=1)
    best = np.argpartition(candidates, -k, axis=1)[:, -k:]  # [n, k], unordered; NaN counts as largest
    if columns is not None:
        best = np.take_along_axis(columns, best, axis=1)
    best.sort(axis=1)  # column order, which _ranked keeps among equal scores
    return np.take_along_axis(best, _ranked(np.take_along_axis(scores, best, axis=1), k), axis=1)


def _ranked(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the k largest of each row, largest first, equal scores in position order, NaN first:
    a stable ascending sort of the reversed row, read backwards (numpy sorts NaN last)."""
    return (scores.shape[1] - 1) - scores[:, ::-1].argsort(axis=1, kind="stable")[:, : -k - 1 : -1]
