"""What a server needs from the search loop: token log-probs, rows ended early, one RNG per row, and
the per-token scores of a beam answer.

Oracles: transformers' processed `scores` of the same greedy generate (log-probs), the same call
without the extras (stop rows), each input generated alone with its seed (row seeds), and the beam
scores of `generate_with_scores` (token scores).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import runtime
from runtime.errors import InvalidOptionError
from tests.fixtures.hf_models import SAMPLE_TEXTS

BATCH = SAMPLE_TEXTS[:3]  # different lengths -> right padding


@pytest.fixture(scope="module")
def t5(exported_dir, hf_tokenizer):
    model = runtime.load(exported_dir("t5"), provider="cpu", threads=1)
    inputs = hf_tokenizer("t5")(BATCH, padding=True, return_tensors="np")
    return model, inputs["input_ids"], inputs["attention_mask"]


def test_logprobs_are_log_softmax_of_transformers_processed_scores(t5, hf_torch_model, hf_tokenizer):
    model, input_ids, mask = t5
    options = dict(max_new_tokens=10, repetition_penalty=1.3)  # a rule edits the scores first
    steps = list(model.stream_steps(input_ids, mask, logprobs=True, **options))
    ids = np.stack([s.ids for s in steps], axis=1)
    logprobs = np.stack([s.logprobs for s in steps], axis=1)

    pt_inputs = hf_tokenizer("t5")(BATCH, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = hf_torch_model("t5").generate(**pt_inputs, **options, do_sample=False, output_scores=True,
                                                 return_dict_in_generate=True)
    np.testing.assert_array_equal(ids, expected.sequences.numpy()[:, 1:])
    for t, scores in enumerate(expected.scores):
        reference = torch.log_softmax(scores, dim=-1).numpy()[np.arange(len(BATCH)), ids[:, t]]
        running = np.array([t == 0 or model.manifest.eos_token_ids[0] not in ids[row, :t] for row in range(len(BATCH))])
        np.testing.assert_allclose(logprobs[running, t], reference[running], rtol=1e-4, atol=1e-4)
        assert (logprobs[~running, t] == 0).all()


def test_plain_stream_steps_equal_stream(t5):
    model, input_ids, mask = t5
    steps = list(model.stream_steps(input_ids, mask, max_new_tokens=12))
    assert all(s.logprobs is None for s in steps)
    expected = list(model.stream(input_ids, mask, max_new_tokens=12))
    np.testing.assert_array_equal(np.stack([s.ids for s in steps]), np.stack(expected))


def test_a_stopped_row_ends_and_the_others_do_not_change(t5):
    model, input_ids, mask = t5
    full = np.stack(list(model.stream(input_ids, mask, max_new_tokens=12, min_new_tokens=12)), axis=1)
    stop_rows: set[int] = set()
    got = []
    for t, step in enumerate(model.stream_steps(input_ids, mask, stop_rows=stop_rows, max_new_tokens=12,
                                                min_new_tokens=12)):
        got.append(step.ids)
        if t == 3:
            stop_rows.add(1)
    got = np.stack(got, axis=1)
    np.testing.assert_array_equal(got[[0, 2]], full[[0, 2]])
    np.testing.assert_array_equal(got[1, :4], full[1, :4])
    assert (got[1, 4:] == model.manifest.pad_token_id).all()


def test_row_seeds_draw_what_each_input_alone_draws(t5):
    model, input_ids, mask = t5
    seeds = [11, 12, 13]
    options = dict(do_sample=True, top_k=0, max_new_tokens=12)
    batched = np.stack([s.ids for s in model.stream_steps(input_ids, mask, row_seeds=seeds, **options)], axis=1)
    for row, seed in enumerate(seeds):
        length = int(mask[row].sum())
        alone = model.generate(input_ids[row: row + 1, :length], **options, seed=seed)[0, 1:]
        np.testing.assert_array_equal(batched[row, : alone.shape[0]], alone)
        assert (batched[row, alone.shape[0]:] == model.manifest.pad_token_id).all()
    assert len({tuple(row) for row in batched}) == len(seeds)


def test_stream_steps_refuses_beams_and_stray_seeds(t5):
    model, input_ids, mask = t5
    with pytest.raises(InvalidOptionError, match="num_beams=3"):
        model.stream_steps(input_ids, mask, num_beams=3)
    with pytest.raises(InvalidOptionError, match="do_sample"):
        model.stream_steps(input_ids, mask, row_seeds=[1, 2, 3])
    with pytest.raises(InvalidOptionError, match="3 rows"):
        model.stream_steps(input_ids, mask, row_seeds=[1], do_sample=True)


@pytest.mark.parametrize("options", [dict(num_beams=3, num_return_sequences=2, length_penalty=1.0),
                                     dict(num_beams=4, length_penalty=2.0, no_repeat_ngram_size=2)])
def test_token_scores_sum_to_the_beam_score(t5, options):
    model, input_ids, mask = t5
    result = model.generate_with_scores(input_ids, mask, max_new_tokens=10, **options)
    scores = model.token_scores(input_ids, mask, result.sequences, max_new_tokens=10, **options)
    assert scores.shape == (result.sequences.shape[0], result.sequences.shape[1] - 1)
    eos = model.manifest.eos_token_ids[0]
    for row, sequence in enumerate(result.sequences):
        ends = np.flatnonzero(sequence[1:] == eos)
        generated = int(ends[0]) + 1 if ends.size else sequence.shape[0] - 1
        assert (scores[row, generated:] == 0).all()
        total = scores[row, :generated].sum() / generated ** options["length_penalty"]
        np.testing.assert_allclose(total, result.scores[row], rtol=1e-4, atol=1e-4)
