"""Beam search (runtime/search/beam.py) returns transformers' `generate(num_beams>1)` tokens and scores.

Oracle: the same tiny random-weight torch model, run once by `generate` and once by our search
through tests/torch_step.py (no ONNX), so a difference can only come from the search. The logits
are then identical and only log_softmax's float32 rounding differs (numpy's vs torch's, ~1 ulp):
hence exact tokens and scores within 1e-5.

Two sets of models: the session's fixture checkpoints (every architecture, with its
generation_config defaults: forced BOS/EOS, bad words), and models built here for the search
itself: an EOS bias tuned so that hypotheses finish at many different steps (finished-hypothesis
bookkeeping, length penalty and early stopping all matter), two EOS ids, and a wide vocabulary.
Inputs of different lengths are padded into one batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    GenerationConfig,
    T5Config,
    T5ForConditionalGeneration,
)

from runtime.logits import build_rules
from runtime.options import GenerationOptions
from runtime.search.beam import beam_search
from runtime.search.log_probs import top_k_indices
from tests.fixtures.hf_models import SAMPLE_TEXTS, VARIANTS
from tests.torch_step import TorchDecoderStep

VOCAB = 48  # small, so that EOS competes with few tokens
SOURCE_LENGTHS = (7, 3, 5)  # a padded batch: every input but the first is padded


@dataclass(frozen=True)
class Case:
    model: torch.nn.Module
    input_ids: np.ndarray  # [batch, src_len] int64, right-padded
    attention_mask: np.ndarray  # [batch, src_len] int64


def _tiny_t5(seed: int, eos_bias: float) -> torch.nn.Module:
    config = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      initializer_factor=8.0,  # default 1.0: every row repeats one token
                      tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config).eval()
    # T5's lm_head has no bias; a biased one (torch only, never exported) lets EOS compete
    lm_head = torch.nn.Linear(config.d_model, VOCAB, bias=True)
    with torch.no_grad():
        lm_head.weight.normal_(0.0, 0.05)
        lm_head.bias.zero_()
        lm_head.bias[config.eos_token_id] = eos_bias
    model.lm_head = lm_head
    return model


def _tiny_bart(seed: int, eos_bias: float, vocab_size: int = VOCAB) -> torch.nn.Module:
    config = BartConfig(vocab_size=vocab_size, d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_position_embeddings=64,
                        init_std=0.3,  # default 0.02: near-uniform logits
                        forced_bos_token_id=None, forced_eos_token_id=None)
    torch.manual_seed(seed)
    model = BartForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.final_logits_bias[0, config.eos_token_id] = eos_bias
    return model


def _with_inputs(model: torch.nn.Module, eos_token_id: int | list[int] | None) -> Case:
    config = model.config
    # only the ids here are special to generate: nothing else (forced tokens, ...) is on by default
    model.generation_config = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id, bos_token_id=config.bos_token_id,
        eos_token_id=eos_token_id, pad_token_id=config.pad_token_id)
    rng = np.random.default_rng(0)
    input_ids = np.full((len(SOURCE_LENGTHS), max(SOURCE_LENGTHS)), config.pad_token_id, dtype=np.int64)
    attention_mask = np.zeros_like(input_ids)
    for row, length in enumerate(SOURCE_LENGTHS):
        input_ids[row, : length - 1] = rng.integers(3, VOCAB, length - 1)
        input_ids[row, length - 1] = config.eos_token_id
        attention_mask[row, :length] = 1
    return Case(model, input_ids, attention_mask)


# t5: relative positions; bart: learned positions and a pad id that is not 0; bart-2eos: two EOS ids
# (so 3 * num_beams candidates per step); bart-wide: num_beams * vocab wide enough for the blocked
# top-k. T5 with two EOS ids is left out: its near position-independent tiny decoder scores
# permutations of one token set within an ulp, so the rounding of log_softmax alone would reorder
# hypotheses there.
MODELS = {
    "t5": lambda: _with_inputs(_tiny_t5(seed=0, eos_bias=4.0), eos_token_id=1),
    "bart": lambda: _with_inputs(_tiny_bart(seed=0, eos_bias=1.9), eos_token_id=2),
    "bart-2eos": lambda: _with_inputs(_tiny_bart(seed=1, eos_bias=1.9), eos_token_id=[2, 7]),
    "bart-wide": lambda: _with_inputs(_tiny_bart(seed=0, eos_bias=4.0, vocab_size=1000), eos_token_id=2),
}

# Every value of each option, and every early_stopping x length_penalty pair, at least once.
SEARCHES = [
    dict(num_beams=2, num_return_sequences=1, length_penalty=1.0, early_stopping=False, max_new_tokens=12),
    dict(num_beams=2, num_return_sequences=2, length_penalty=0.0, early_stopping=True, max_new_tokens=5),
    dict(num_beams=2, num_return_sequences=2, length_penalty=2.0, early_stopping="never", max_new_tokens=12),
    dict(num_beams=4, num_return_sequences=1, length_penalty=-0.5, early_stopping="never", max_new_tokens=5),
    dict(num_beams=4, num_return_sequences=2, length_penalty=1.0, early_stopping=True, max_new_tokens=12),
    dict(num_beams=4, num_return_sequences=4, length_penalty=2.0, early_stopping=False, max_new_tokens=12),
    dict(num_beams=4, num_return_sequences=4, length_penalty=-0.5, early_stopping=True, max_new_tokens=12),
    dict(num_beams=4, num_return_sequences=2, length_penalty=0.0, early_stopping="never", max_new_tokens=12),
    dict(num_beams=4, num_return_sequences=4, length_penalty=1.0, early_stopping="never", max_new_tokens=12),
    dict(num_beams=2, num_return_sequences=1, length_penalty=-0.5, early_stopping=False, max_new_tokens=12),
    dict(num_beams=4, num_return_sequences=1, length_penalty=2.0, early_stopping=True, max_new_tokens=5),
    dict(num_beams=4, num_return_sequences=4, length_penalty=0.0, early_stopping=False, max_new_tokens=12),
]

# On the fixture checkpoints, which also bring their generation_config's rules.
FIXTURE_SEARCHES = [
    dict(num_beams=4, num_return_sequences=2, length_penalty=1.0, early_stopping=False, max_new_tokens=12),
    dict(num_beams=2, num_return_sequences=2, length_penalty=2.0, early_stopping=True, max_new_tokens=12),
    dict(num_beams=4, num_return_sequences=4, length_penalty=-0.5, early_stopping="never", max_new_tokens=5),
]

# Logits rules on the log-probs, forced tokens included (-inf rows, copies of one beam at step 1).
RULED_SEARCHES = [
    dict(num_beams=4, num_return_sequences=2, no_repeat_ngram_size=2, repetition_penalty=1.3,
         min_new_tokens=3, max_new_tokens=12),
    dict(num_beams=3, num_return_sequences=3, forced_bos_token_id=5, forced_eos_token_id=2,
         bad_words_ids=[[9], [11, 12]], early_stopping=True, max_new_tokens=10),
    dict(num_beams=4, num_return_sequences=1, min_length=8, length_penalty=2.0, early_stopping="never",
         max_length=14),
]


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, Case]:
    return {name: build() for name, build in MODELS.items()}


def _search_id(search: dict[str, Any]) -> str:
    return "-".join(f"{key}={value}" for key, value in search.items())


def _run_both(case: Case, search: dict[str, Any]) -> tuple[Any, Any, TorchDecoderStep]:
    """Run transformers' generate and our beam search with the same options (the model's
    generation_config, then `search`); return both results and our step."""
    model = case.model
    with torch.no_grad():
        expected = model.generate(input_ids=torch.from_numpy(case.input_ids),
                                  attention_mask=torch.from_numpy(case.attention_mask), do_sample=False,
                                  output_scores=True, return_dict_in_generate=True, **search)
    generation = model.generation_config
    eos = generation.eos_token_id
    options = GenerationOptions.resolve(
        generation.to_diff_dict(), search, eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,),
        pad_token_id=generation.pad_token_id, decoder_start_token_id=generation.decoder_start_token_id)
    step = TorchDecoderStep(model, case.input_ids, case.attention_mask, options.num_beams)
    start_ids = np.full(case.input_ids.shape[0], options.decoder_start_token_id, dtype=np.int64)
    ours = beam_search(step, start_ids, build_rules(options, model.config.vocab_size), options)
    return expected, ours, step


def _assert_same(expected: Any, ours: Any) -> None:
    np.testing.assert_array_equal(ours.sequences, expected.sequences.numpy())
    assert ours.sequences.dtype == np.int64 and ours.scores.dtype == np.float32
    # float32 log_softmax rounding differs between numpy and torch by ~1 ulp per step
    np.testing.assert_allclose(ours.scores, expected.sequences_scores.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("search", FIXTURE_SEARCHES, ids=_search_id)
@pytest.mark.parametrize("variant", VARIANTS)
def test_beam_search_matches_generate_on_fixture_checkpoints(variant, search, hf_torch_model, hf_tokenizer):
    batch = hf_tokenizer(variant)(SAMPLE_TEXTS[:3], padding=True, return_tensors="np")
    case = Case(hf_torch_model(variant), batch["input_ids"].astype(np.int64),
                batch["attention_mask"].astype(np.int64))
    expected, ours, _ = _run_both(case, search)
    _assert_same(expected, ours)


@pytest.mark.parametrize("search", SEARCHES, ids=_search_id)
@pytest.mark.parametrize("model_name", MODELS)
def test_beam_search_matches_generate(tiny_models, model_name, search):
    expected, ours, _ = _run_both(tiny_models[model_name], search)
    _assert_same(expected, ours)


@pytest.mark.parametrize("search", RULED_SEARCHES, ids=_search_id)
@pytest.mark.parametrize("model_name", ["t5", "bart"])
def test_beam_search_with_rules_matches_generate(tiny_models, model_name, search):
    expected, ours, _ = _run_both(tiny_models[model_name], search)
    _assert_same(expected, ours)


def test_settled_inputs_leave_the_step(tiny_models):
    """An input whose hypotheses can no longer change stops costing decoder rows, and results still match."""
    search = dict(num_beams=2, num_return_sequences=2, early_stopping=True, max_new_tokens=12)
    expected, ours, step = _run_both(tiny_models["bart"], search)
    _assert_same(expected, ours)
    full_rows = tiny_models["bart"].input_ids.shape[0] * search["num_beams"]
    assert step.rows_run < step.calls * full_rows


def test_beam_search_without_eos_matches_generate():
    """No EOS id: 2 * num_beams candidates per step, and every hypothesis runs to max_length."""
    case = _with_inputs(_tiny_bart(seed=0, eos_bias=1.9), eos_token_id=None)
    model = case.model
    with torch.no_grad():
        expected = model.generate(input_ids=torch.from_numpy(case.input_ids),
                                  attention_mask=torch.from_numpy(case.attention_mask), num_beams=3,
                                  num_return_sequences=2, max_new_tokens=6, do_sample=False,
                                  output_scores=True, return_dict_in_generate=True)
    # GenerationOptions.resolve always supplies the manifest's EOS; built directly, it can have none
    options = GenerationOptions(num_beams=3, num_return_sequences=2, max_new_tokens=6, eos_token_id=None,
                                pad_token_id=model.config.pad_token_id)
    step = TorchDecoderStep(model, case.input_ids, case.attention_mask, num_beams=3)
    start_ids = np.full(case.input_ids.shape[0], model.config.decoder_start_token_id, dtype=np.int64)
    _assert_same(expected, beam_search(step, start_ids, [], options))


@pytest.mark.parametrize("width", [4 * VOCAB, 1000, 4 * 32128 + 7])  # sorted; partitioned; blocked (short last block)
def test_top_k_orders_like_torch_topk(width):
    """Distinct scores: the same indices in the same order as torch.topk (ties are documented apart)."""
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((5, width)).astype(np.float32)
    scores[:, ::7] = -np.inf  # banned tokens sort last, as in torch
    scores[:, -2] = 10.0  # the best score in the last, short block
    for k in (1, 4, 8, 12):
        expected = torch.topk(torch.from_numpy(scores), k).indices.numpy()
        np.testing.assert_array_equal(top_k_indices(scores, k), expected)


def test_top_k_with_few_finite_scores_returns_distinct_indices():
    """Forced tokens leave one finite score per beam: the rest of the k are distinct -inf columns."""
    scores = np.full((2, 4 * 32128 + 5), -np.inf, dtype=np.float32)
    scores[0, [5, 70000]] = (1.0, 2.0)
    scores[1, -1] = 0.0
    top = top_k_indices(scores, 8)
    assert top[0, :2].tolist() == [70000, 5] and top[1, 0] == scores.shape[1] - 1
    assert all(len(set(row)) == 8 for row in top.tolist()) and top.max() < scores.shape[1]


def test_top_k_breaks_ties_by_lower_index():
    scores = np.array([[0.0, 1.0, 1.0, 0.5, 1.0]], dtype=np.float32)
    np.testing.assert_array_equal(top_k_indices(scores, 3), [[1, 2, 4]])


@pytest.mark.parametrize("width", [12, 1000, 4 * 32128 + 7])  # sorted; partitioned; blocked
def test_top_k_ranks_nan_first_like_torch(width):
    """A banned +inf score becomes NaN (bad_words, as in transformers); torch.topk ranks NaN above
    everything, and so must every path of top_k_indices."""
    rng = np.random.default_rng(1)
    scores = rng.standard_normal((3, width)).astype(np.float32)
    scores[0, 5] = np.nan
    scores[1, [2, 9]] = np.nan
    scores[2, 3] = -np.inf
    got = top_k_indices(scores, 4)
    expected = torch.topk(torch.from_numpy(scores), 4).indices.numpy()
    np.testing.assert_array_equal(got[0], expected[0])  # NaN, then the largest numbers
    assert got[1, :2].tolist() == [2, 9]  # equal (NaN) scores: lowest index first
    np.testing.assert_array_equal(got[1, 2:], expected[1, 2:])
    np.testing.assert_array_equal(got[2], expected[2])


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("bans", [(), (3,), (3, 11)])
@pytest.mark.parametrize("in_slots", [False, True])
def test_the_ranking_graph_ranks_as_numpy(dtype, bans, in_slots):
    """runtime/graphs' beam_candidates (what CachedDecoder runs where the logits live) against
    `rank_candidates` over numpy's log-softmax and top-k (what any other step runs): same candidates,
    same order, scores equal, with equal scores (identical rows, as at the first step, and repeated
    logits within a row) and banned ids among the best; in_slots: the logits rows in another order within
    each input (a decoder's slots after a beam reorder), named by row_of_beam: the ranking is the beams'."""
    from runtime.search.log_probs import log_softmax, rank_candidates
    from runtime.sessions import ProviderConfig
    from runtime.tensor_ops import TensorOps

    rng = np.random.default_rng(1)
    n, beams, vocab, keep = 3, 4, 40, 8
    logits = rng.standard_normal((n * beams, 1, vocab)).astype(dtype)
    logits[:, 0, 3] = logits[:, 0, 11] = 9.0  # banned ids among the best
    logits[:, 0, 20:23] = 5.0  # ties within a row
    logits[beams:2 * beams] = logits[beams]  # the second input's beams: identical rows
    scores = rng.standard_normal((n, beams)).astype(np.float32)
    scores[1] = 0.5  # and scores: every candidate of a beam ties with the same one of each other beam
    k = keep + len(bans)
    ops = TensorOps(ProviderConfig("cpu", 1, True))
    eos = (3, 21)  # a banned id (stopping only when not banned) and one of the ties
    if in_slots:
        slots = np.concatenate([first + rng.permutation(beams) for first in range(0, n * beams, beams)])
        held = np.empty_like(logits)
        held[slots] = logits  # beam i's logits in row slots[i]
        got = ops.beam_candidates(held, k, scores, bans, keep, eos, slots)
    else:
        got = ops.beam_candidates(logits, k, scores, bans, keep, eos)
    log_probs = log_softmax(logits[:, 0, :].astype(np.float32))
    ids = top_k_indices(log_probs, k)
    expected = rank_candidates(np.take_along_axis(log_probs, ids, axis=1), ids, scores, bans, keep, eos)
    np.testing.assert_array_equal(got.beams, expected.beams)
    np.testing.assert_array_equal(got.token_ids, expected.token_ids)
    np.testing.assert_array_equal(got.stops, expected.stops)
    assert got.stopping == expected.stopping > 0
    np.testing.assert_allclose(got.scores, expected.scores, rtol=0, atol=2e-6)  # log_softmax: onnxruntime's, numpy's
    assert not np.isin(got.token_ids, bans).any()


class _HistoryStep:
    """A stand-in decoder with random logits over a tiny vocabulary (beams often pick the same tokens and
    end early) that keeps each row's fed tokens, and checks every reorder's `shared` against them."""

    def __init__(self, rows: int, vocab: int, seed: int):
        self.rng = np.random.default_rng(seed)
        self.vocab = vocab
        self.history: list[list[int]] = [[] for _ in range(rows)]
        self.checked = 0

    def __call__(self, input_ids: np.ndarray) -> np.ndarray:
        for row, token in zip(self.history, input_ids.tolist()):
            row.append(token)
        return self.rng.standard_normal((len(self.history), self.vocab)).astype(np.float32) * 3

    def select(self, rows: np.ndarray, shared=None) -> None:
        if shared is not None:
            beams = len(shared[0])
            for index, first in enumerate(rows.tolist()[::beams]):
                base = first - first % beams
                for a in range(beams):
                    for b in range(beams):
                        one, other = self.history[base + a], self.history[base + b]
                        differ = [p for p, (x, y) in enumerate(zip(one, other)) if x != y]
                        if differ:
                            assert shared[index][a][b] == differ[0], (index, a, b)
                        else:
                            assert shared[index][a][b] >= len(one), (index, a, b)
                        self.checked += 1
        self.history = [list(self.history[row]) for row in rows.tolist()]


@pytest.mark.parametrize("seed", range(4))
def test_a_reorder_is_told_where_the_beams_first_differ(seed):
    """beam search keeps each two beams' first differing position step by step (`_next_prefix`, from the
    parents and the new tokens) instead of comparing histories: checked against the rows' fed tokens,
    with beams that pick the same tokens, end and leave the step."""
    batch, beams = 3, 4
    step = _HistoryStep(batch * beams, vocab=6, seed=seed)
    options = GenerationOptions(num_beams=beams, max_new_tokens=9, eos_token_id=2, pad_token_id=0, early_stopping=True)
    beam_search(step, np.zeros(batch, dtype=np.int64), [], options)
    assert step.checked > 0
