"""Each logits rule against its transformers processor, and option resolution against transformers' generate.

The oracle is `transformers.generation.logits_process` on the same random scores and sequences
(several seeds, rows > 1, -inf entries, sequences drawn from a few tokens so that repeats and
n-gram matches happen). Rule order and length resolution are read from a real (tiny, random) BART
`generate` call, stopped right after it built its processors.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration, GenerationConfig
from transformers.generation import logits_process as tlp

from runtime.errors import InvalidOptionError
from runtime.logits import (
    BadWords,
    ForcedBOS,
    ForcedEOS,
    MinLength,
    NoRepeatNgram,
    RepetitionPenalty,
    Temperature,
    TopK,
    TopP,
    build_rules,
    build_warpers,
)
from runtime.options import GenerationOptions

SEEDS = [0, 1, 2]
VOCAB = 40


def random_case(seed: int, cur_len: int, rows: int = 6, tokens: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """sequences [rows, cur_len] int64 from `tokens` distinct ids; scores [rows, VOCAB] float32 with some -inf."""
    rng = np.random.default_rng(seed)
    sequences = rng.integers(0, tokens, size=(rows, cur_len), dtype=np.int64)
    scores = (rng.standard_normal((rows, VOCAB)) * 3).astype(np.float32)
    scores[rng.random(scores.shape) < 0.1] = -np.inf
    return sequences, scores


def assert_matches(rule, processor, sequences: np.ndarray, scores: np.ndarray) -> None:
    ours = scores.copy()
    assert rule(sequences, ours) is None  # edits in place
    expected = processor(torch.from_numpy(sequences), torch.from_numpy(scores.copy())).numpy()
    np.testing.assert_array_equal(ours, expected)  # bit-identical; -inf and NaN compare equal


# -- rules vs transformers' processors ---------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cur_len", [1, 3, 4, 5, 9])  # below, at and above min_length 4
@pytest.mark.parametrize("eos", [(2,), (2, 5)])
def test_min_length(seed, cur_len, eos):
    sequences, scores = random_case(seed, cur_len)
    assert_matches(MinLength(4, eos), tlp.MinLengthLogitsProcessor(4, list(eos)), sequences, scores)
    # min_new_tokens=3 after the one-token decoder prompt is min_length 4 (what generate sets)
    assert_matches(MinLength(3 + 1, eos), tlp.MinNewTokensLengthLogitsProcessor(1, 3, list(eos)), sequences, scores)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
@pytest.mark.parametrize("cur_len", [1, 6, 15])
def test_repetition_penalty(seed, penalty, cur_len):
    sequences, scores = random_case(seed, cur_len)
    scores[0, sequences[0, 0]] = 0.0  # zero is divided, like a positive score
    processor = tlp.RepetitionPenaltyLogitsProcessor(penalty)
    assert_matches(RepetitionPenalty(penalty), processor, sequences, scores)
    # beam search applies rules to log-probabilities (all <= 0): the penalty multiplies them
    log_probs = torch.log_softmax(torch.from_numpy(scores), dim=-1).numpy()
    assert_matches(RepetitionPenalty(penalty), processor, sequences, log_probs)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("ngram_size", [1, 2, 3, 5])
@pytest.mark.parametrize("cur_len", [1, 2, 4, 5, 12])  # includes n-gram sizes larger than the sequence
@pytest.mark.parametrize("tokens", [2, 6])
def test_no_repeat_ngram(seed, ngram_size, cur_len, tokens):
    sequences, scores = random_case(seed, cur_len, tokens=tokens)
    assert_matches(NoRepeatNgram(ngram_size), tlp.NoRepeatNGramLogitsProcessor(ngram_size), sequences, scores)


BAD_WORDS = [
    [[7]],  # one token
    [[7], [3, 4], [3, 4, 5], [1, 4]],  # one and several tokens, shared last token
    [[2], [9], [2, 3]],  # EOS alone is dropped, EOS inside a word is not
    [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]],  # longer than most sequences
    [[4, 5], [4, 5], [5, 5, 5]],  # duplicates
]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("bad_words_ids", BAD_WORDS)
@pytest.mark.parametrize("cur_len", [1, 2, 3, 10])
def test_bad_words(seed, bad_words_ids, cur_len):
    sequences, scores = random_case(seed, cur_len)
    if cur_len >= 2:  # half the rows end with a full prefix, one with a partial one
        sequences[::2, -2:] = [3, 4]
        sequences[1, -1] = 3
    processor = tlp.NoBadWordsLogitsProcessor(bad_words_ids, eos_token_id=2)
    assert_matches(BadWords(bad_words_ids, (2,)), processor, sequences, scores)


def test_bad_words_prefix_equal_to_whole_sequence_is_not_checked():
    """transformers skips a bad word longer than the sequence, even when its prefix is the whole sequence."""
    sequences, scores = random_case(0, 3)
    scores[:, 11] = 1.0
    word = [*sequences[0].tolist(), 11]
    assert_matches(BadWords([word], (2,)), tlp.NoBadWordsLogitsProcessor([word], 2), sequences, scores)
    kept = scores.copy()
    BadWords([word], (2,))(sequences, kept)
    assert kept[0, 11] == 1.0


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_bad_words_add_minus_inf_like_transformers():
    """The ban is a -inf bias: a +inf score becomes NaN in both."""
    sequences, scores = random_case(1, 4)
    scores[:, 7] = np.inf
    assert_matches(BadWords([[7]], (2,)), tlp.NoBadWordsLogitsProcessor([[7]], 2), sequences, scores)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cur_len", [1, 2, 5])
def test_forced_bos(seed, cur_len):
    sequences, scores = random_case(seed, cur_len)
    assert_matches(ForcedBOS(0), tlp.ForcedBOSTokenLogitsProcessor(0), sequences, scores)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("cur_len", [3, 4, 5, 6])  # forced when cur_len == max_length - 1 == 5
@pytest.mark.parametrize("eos", [2, (2, 5)])
def test_forced_eos(seed, cur_len, eos):
    sequences, scores = random_case(seed, cur_len)
    processor = tlp.ForcedEOSTokenLogitsProcessor(6, eos if isinstance(eos, int) else list(eos))
    assert_matches(ForcedEOS(6, eos), processor, sequences, scores)


# -- sampling warpers ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.7])
def test_temperature(seed, temperature):
    sequences, scores = random_case(seed, 3)
    assert_matches(Temperature(temperature), tlp.TemperatureLogitsWarper(temperature), sequences, scores)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("top_k", [1, 3, 10, VOCAB, VOCAB + 5])
@pytest.mark.parametrize("ties", [False, True])
def test_top_k(seed, top_k, ties):
    sequences, scores = random_case(seed, 3)
    if ties:  # a few distinct values: every score tied with the k-th best is kept
        scores = np.round(scores / 2).astype(np.float32)
    assert_matches(TopK(top_k), tlp.TopKLogitsWarper(top_k), sequences, scores)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("top_p", [0.0, 0.05, 0.3, 0.9, 0.99, 1.0])
def test_top_p(seed, top_p):
    sequences, scores = random_case(seed, 3, rows=8)
    assert_matches(TopP(top_p), tlp.TopPLogitsWarper(top_p), sequences, scores)


# -- invalid arguments ------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [
    lambda: MinLength(-1, (2,)),
    lambda: MinLength(3, ()),
    lambda: MinLength(3, (-2,)),
    lambda: RepetitionPenalty(0.0),
    lambda: RepetitionPenalty(-1.5),
    lambda: RepetitionPenalty(float("nan")),
    lambda: NoRepeatNgram(0),
    lambda: NoRepeatNgram(2.5),
    lambda: BadWords([], (2,)),
    lambda: BadWords([[]], (2,)),
    lambda: BadWords([[3, -1]], (2,)),
    lambda: BadWords([[2]], (2,)),  # only EOS: transformers fails too (nothing left to ban)
    lambda: ForcedBOS(-1),
    lambda: ForcedBOS(None),
    lambda: ForcedEOS(0, (2,)),
    lambda: ForcedEOS(10, ()),
    lambda: Temperature(0.0),
    lambda: TopK(0),
    lambda: TopK(True),
    lambda: TopP(-0.1),
    lambda: TopP(1.5),
])
def test_invalid_arguments_raise(make):
    with pytest.raises(InvalidOptionError):
        make()


def test_invalid_argument_message_names_argument_and_value():
    with pytest.raises(InvalidOptionError, match=r"no_repeat_ngram_size=-3"):
        NoRepeatNgram(-3)


@pytest.mark.parametrize("overrides", [
    dict(forced_bos_token_id=VOCAB), dict(forced_eos_token_id=VOCAB + 1), dict(bad_words_ids=[[5], [6, VOCAB]]),
    dict(eos_token_id=VOCAB),
])
def test_build_rules_rejects_token_ids_outside_the_vocabulary(overrides):
    options = resolve({}, overrides)
    with pytest.raises(InvalidOptionError, match="vocabulary"):
        build_rules(options, VOCAB)


# -- order and lengths against transformers' generate ---------------------------------------------------
EOS, PAD, START = 2, 1, 2


@functools.cache
def tiny_bart(max_position_embeddings: int) -> BartForConditionalGeneration:
    config = BartConfig(
        vocab_size=VOCAB, d_model=8, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
        max_position_embeddings=max_position_embeddings, bos_token_id=0, pad_token_id=PAD, eos_token_id=EOS,
        decoder_start_token_id=START, forced_eos_token_id=None,
    )
    torch.manual_seed(0)
    return BartForConditionalGeneration(config).eval()


class _Built(Exception):
    """Stops transformers' generate once it has resolved its config and built its processors."""


def transformers_setup(defaults: dict, overrides: dict, monkeypatch, max_position_embeddings: int = 64):
    """(resolved GenerationConfig, LogitsProcessorList) of a real `generate` call."""
    model = tiny_bart(max_position_embeddings)
    model.generation_config = GenerationConfig(eos_token_id=EOS, pad_token_id=PAD, decoder_start_token_id=START,
                                               **defaults)
    original = type(model)._get_logits_processor
    built = {}

    def spy(self, generation_config, *args, **kwargs):
        built["config"] = generation_config
        built["processors"] = original(self, generation_config, *args, **kwargs)
        raise _Built

    monkeypatch.setattr(type(model), "_get_logits_processor", spy)
    with pytest.raises(_Built):
        model.generate(torch.tensor([[5, 6, 7, EOS]]), **overrides)
    return built["config"], built["processors"]


def resolve(defaults: dict, overrides: dict, max_position_embeddings: int | None = 64) -> GenerationOptions:
    return GenerationOptions.resolve(defaults, overrides, eos_token_ids=(EOS,), pad_token_id=PAD,
                                     decoder_start_token_id=START, max_position_embeddings=max_position_embeddings)


# transformers' processor class -> our rule class (both min-length processors are one MinLength)
OURS = {
    tlp.RepetitionPenaltyLogitsProcessor: RepetitionPenalty,
    tlp.NoRepeatNGramLogitsProcessor: NoRepeatNgram,
    tlp.NoBadWordsLogitsProcessor: BadWords,
    tlp.MinLengthLogitsProcessor: MinLength,
    tlp.MinNewTokensLengthLogitsProcessor: MinLength,
    tlp.ForcedBOSTokenLogitsProcessor: ForcedBOS,
    tlp.ForcedEOSTokenLogitsProcessor: ForcedEOS,
    tlp.TemperatureLogitsWarper: Temperature,
    tlp.TopKLogitsWarper: TopK,
    tlp.TopPLogitsWarper: TopP,
}


@pytest.mark.parametrize("defaults, overrides", [
    ({}, dict(repetition_penalty=1.3, no_repeat_ngram_size=2, bad_words_ids=[[5], [6, 7]], min_length=3,
              forced_bos_token_id=0, forced_eos_token_id=EOS, max_new_tokens=5)),
    # bart-large-cnn's generation_config
    (dict(num_beams=4, no_repeat_ngram_size=3, min_length=10, max_length=30, forced_bos_token_id=0,
          forced_eos_token_id=EOS, length_penalty=2.0, early_stopping=True), {}),
    (dict(do_sample=True, temperature=0.7, top_k=10, top_p=0.9), dict(min_new_tokens=2, repetition_penalty=0.8)),
    (dict(temperature=0.7, top_k=10, top_p=0.9), {}),  # not sampling: no warpers
    (dict(do_sample=True), dict(min_new_tokens=0)),  # transformers' default top_k=50 only
    (dict(bad_words_ids=[[EOS], [9]], min_length=1), dict(max_length=12)),
    ({}, dict(forced_eos_token_id=[EOS, 3], min_length=0)),
])
def test_build_rules_in_transformers_order(defaults, overrides, monkeypatch):
    config, processors = transformers_setup(defaults, overrides, monkeypatch)
    expected = []
    for processor in processors:
        if not expected or OURS[type(processor)] is not expected[-1]:
            expected.append(OURS[type(processor)])
    options = resolve(defaults, overrides)
    rules = build_rules(options, VOCAB) + build_warpers(options)
    assert [type(rule) for rule in rules] == expected
    for rule in rules:
        if isinstance(rule, ForcedEOS):
            assert rule.max_length == config.max_length
        if isinstance(rule, MinLength):
            assert rule.min_length == config.min_length


@pytest.mark.parametrize("defaults, overrides, max_positions", [
    ({}, {}, 64),  # nothing set: 20 new tokens, so 21 in all
    ({}, {}, 16),  # ... capped at max_position_embeddings
    (dict(max_length=20), {}, 64),  # the default value in the config counts as unset
    ({}, dict(max_length=20), 64),  # an explicit max_length in the call does not
    (dict(max_length=30), {}, 64),
    (dict(max_length=30), dict(max_new_tokens=5), 64),
    (dict(max_new_tokens=7), dict(max_length=12), 64),  # max_new_tokens wins wherever it comes from
    (dict(max_new_tokens=7), dict(max_new_tokens=3), 64),
    (dict(min_length=5), dict(min_new_tokens=3), 64),
    (dict(min_new_tokens=2), dict(min_length=6), 64),
    (dict(min_length=6, max_length=9), {}, 64),
    (dict(min_length=6), dict(min_length=2, max_new_tokens=4), 64),
])
def test_resolve_lengths_like_transformers(defaults, overrides, max_positions, monkeypatch):
    config, _ = transformers_setup(defaults, overrides, monkeypatch, max_positions)
    options = resolve(defaults, overrides, max_positions)
    assert options.total_max_length() == config.max_length
    assert options.total_min_length() == config.min_length


def test_resolve_overrides_beat_defaults():
    options = resolve(dict(num_beams=4, length_penalty=2.0, no_repeat_ngram_size=3, bad_words_ids=[[5]]),
                      dict(num_beams=2, no_repeat_ngram_size=None, eos_token_id=[2, 3]))
    assert (options.num_beams, options.length_penalty, options.no_repeat_ngram_size) == (2, 2.0, 3)
    assert options.bad_words_ids == ((5,),) and options.eos_token_ids == (2, 3)
    assert (options.pad_token_id, options.decoder_start_token_id) == (PAD, START)


def test_resolve_ignores_sampling_values_without_sampling():
    """transformers only warns about sampling values when do_sample is off."""
    options = resolve(dict(temperature=0.0, top_p=3.0), {})
    assert build_warpers(options) == []
    with pytest.raises(InvalidOptionError, match="temperature"):
        resolve(dict(temperature=0.0), dict(do_sample=True))


@pytest.mark.parametrize("overrides", [
    dict(num_beams=0),
    dict(num_beams=2, num_return_sequences=3),
    dict(num_return_sequences=2),  # greedy returns one sequence
    dict(num_return_sequences=0),
    dict(max_new_tokens=0),
    dict(max_new_tokens=-4),
    dict(max_length=-5),
    dict(max_length=1),
    dict(min_length=-1),
    dict(min_new_tokens=-2),
    dict(no_repeat_ngram_size=-1),
    dict(repetition_penalty=0.0),
    dict(early_stopping="sometimes"),
    dict(bad_words_ids=[[]]),
    dict(bad_words_ids=[[3, -1]]),
    dict(forced_bos_token_id=-1),
    dict(num_beams="4"),
    dict(do_sample=True, num_beams=2),
    dict(do_sample=True, top_p=1.5),
    dict(do_sample=True, top_k=-1),
    dict(num_beamz=4),  # unknown option
])
def test_resolve_rejects_invalid_options(overrides):
    with pytest.raises(InvalidOptionError):
        resolve({}, overrides)
