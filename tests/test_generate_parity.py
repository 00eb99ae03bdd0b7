"""The product's promise: the ONNX runtime generates exactly the tokens of transformers' `generate`.

Oracle: the same tiny random-weight torch model the export came from, on a padded batch of inputs of
different lengths, for each architecture and each generation option users rely on.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import runtime
from tests.fixtures.hf_models import SAMPLE_TEXTS, VARIANTS

BATCH = SAMPLE_TEXTS[:3]  # three inputs of different lengths -> right padding

CORE = {
    "greedy": dict(num_beams=1, max_new_tokens=16),
    "beam4-nrs2": dict(num_beams=4, num_return_sequences=2, max_new_tokens=12),
}

# Each option, on architectures whose defaults differ (T5: no forced tokens; BART: forced BOS/EOS).
OPTIONS = {
    "max_length": dict(max_length=9),
    "min_new_tokens": dict(min_new_tokens=10, max_new_tokens=14),
    "min_length": dict(min_length=8, max_new_tokens=12),
    "no_repeat_ngram": dict(no_repeat_ngram_size=2, max_new_tokens=16),
    "repetition_penalty": dict(repetition_penalty=1.6, max_new_tokens=16),
    "bad_words": dict(bad_words_ids=[[5], [7, 8]], max_new_tokens=16),
    "forced_bos": dict(forced_bos_token_id=4, max_new_tokens=8),
    "forced_eos": dict(forced_eos_token_id=3, max_new_tokens=8),
    "decoder_start": dict(decoder_start_token_id=5, max_new_tokens=8),
    "beam-early-true": dict(num_beams=3, early_stopping=True, max_new_tokens=12),
    "beam-early-never": dict(num_beams=3, early_stopping="never", length_penalty=0.5, max_new_tokens=12),
    "beam-lp2-nrs3": dict(num_beams=3, num_return_sequences=3, length_penalty=2.0, max_new_tokens=10),
    # MinLength alone: beam search ranks only each row's best candidates, EOS dropped (logits.shared_bans)
    "beam-min-new-tokens": dict(num_beams=4, min_new_tokens=9, max_new_tokens=12),
    "beam-rules": dict(num_beams=4, no_repeat_ngram_size=2, repetition_penalty=1.3, min_new_tokens=4,
                       max_new_tokens=12),
}


def _torch_generate(torch_model, pt_inputs, options):
    with torch.no_grad():
        return torch_model.generate(**pt_inputs, **options, do_sample=False).numpy()


def _case(variant, hf_torch_model, hf_tokenizer, exported_dir):
    tokenizer = hf_tokenizer(variant)
    pt_inputs = tokenizer(BATCH, padding=True, return_tensors="pt")
    model = runtime.load(exported_dir(variant), provider="cpu", threads=1)
    np_inputs = {k: v.numpy() for k, v in pt_inputs.items()}
    return model, hf_torch_model(variant), pt_inputs, np_inputs


@pytest.mark.parametrize("search", CORE)
@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_matches_transformers(variant, search, hf_torch_model, hf_tokenizer, exported_dir):
    model, torch_model, pt_inputs, np_inputs = _case(variant, hf_torch_model, hf_tokenizer, exported_dir)
    options = CORE[search]
    expected = _torch_generate(torch_model, pt_inputs, options)
    assert (np_inputs["attention_mask"] == 0).any(), "the batch must be padded"
    got = model.generate(np_inputs["input_ids"], np_inputs["attention_mask"], **options)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", OPTIONS)
@pytest.mark.parametrize("variant", ["t5", "bart"])
def test_generation_options_match_transformers(variant, name, hf_torch_model, hf_tokenizer, exported_dir):
    model, torch_model, pt_inputs, np_inputs = _case(variant, hf_torch_model, hf_tokenizer, exported_dir)
    options = OPTIONS[name]
    expected = _torch_generate(torch_model, pt_inputs, options)
    got = model.generate(np_inputs["input_ids"], np_inputs["attention_mask"], **options)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("variant", ["t5", "marian"])
def test_beam_scores_match_transformers(variant, hf_torch_model, hf_tokenizer, exported_dir):
    model, torch_model, pt_inputs, np_inputs = _case(variant, hf_torch_model, hf_tokenizer, exported_dir)
    options = dict(num_beams=4, num_return_sequences=2, max_new_tokens=10)
    with torch.no_grad():
        expected = torch_model.generate(**pt_inputs, **options, output_scores=True, return_dict_in_generate=True)
    got = model.generate_with_scores(np_inputs["input_ids"], np_inputs["attention_mask"], **options)
    np.testing.assert_array_equal(got.sequences, expected.sequences.numpy())
    np.testing.assert_allclose(got.scores, expected.sequences_scores.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_generate_text_matches_transformers_decode(variant, hf_torch_model, hf_tokenizer, exported_dir):
    model, torch_model, pt_inputs, _ = _case(variant, hf_torch_model, hf_tokenizer, exported_dir)
    expected = hf_tokenizer(variant).batch_decode(_torch_generate(torch_model, pt_inputs, dict(max_new_tokens=12)),
                                                  skip_special_tokens=True)
    assert model.generate_text(BATCH, max_new_tokens=12) == expected


def test_stream_yields_the_tokens_of_generate(hf_tokenizer, exported_dir):
    model = runtime.load(exported_dir("bart"), provider="cpu")
    inputs = hf_tokenizer("bart")(BATCH, padding=True, return_tensors="np")
    full = model.generate(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=12)
    streamed = np.stack(list(model.stream(inputs["input_ids"], inputs["attention_mask"], max_new_tokens=12)), axis=1)
    np.testing.assert_array_equal(streamed, full[:, 1:])


def test_concurrent_calls_on_one_model_match_serial(hf_tokenizer, exported_dir):
    """One loaded model serves several threads: no per-call state lives on shared objects."""
    from concurrent.futures import ThreadPoolExecutor

    model = runtime.load(exported_dir("t5"), provider="cpu", threads=1)
    tokenizer = hf_tokenizer("t5")
    jobs = [(SAMPLE_TEXTS[i: i + 2], dict(num_beams=1 + i % 3, max_new_tokens=8 + i))
            for i in range(len(SAMPLE_TEXTS) - 1)]
    encoded = [tokenizer(texts, padding=True, return_tensors="np") for texts, _ in jobs]
    serial = [model.generate(e["input_ids"], e["attention_mask"], **o) for e, (_, o) in zip(encoded, jobs)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda k: model.generate(encoded[k]["input_ids"], encoded[k]["attention_mask"],
                                                          **jobs[k][1]), range(len(jobs)) ))
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("variant", ["t5", "bart"])
def test_io_binding_path_matches_plain_runs(variant, hf_tokenizer, exported_dir):
    """IO binding (the default: states as OrtValues, gathers and top-k in helper graphs) and plain numpy
    runs give the same tokens, for the kv-buffer export (whose buffers are bound either way) and for
    optimum's Concat cache."""
    inputs = hf_tokenizer(variant)(BATCH, padding=True, return_tensors="np")
    for export_dir in (exported_dir(variant), exported_dir(variant, kv_buffer=False)):
        plain = runtime.load(export_dir, provider="cpu", io_binding=False)
        bound = runtime.load(export_dir, provider="cpu")
        for options in CORE.values():
            np.testing.assert_array_equal(
                bound.generate(inputs["input_ids"], inputs["attention_mask"], **options),
                plain.generate(inputs["input_ids"], inputs["attention_mask"], **options))


def test_model_pickles_as_its_directory(exported_dir):
    """A loaded model ships to another process (a Ray worker) as its directory and is rebuilt there."""
    import pickle

    model = runtime.load(exported_dir("t5"), provider="cpu", threads=1)
    clone = pickle.loads(pickle.dumps(model))
    assert clone.export_dir == model.export_dir and clone.config == model.config
    np.testing.assert_array_equal(clone.generate([[5, 6, 7]], max_new_tokens=5),
                                  model.generate([[5, 6, 7]], max_new_tokens=5))


@pytest.mark.cuda
@pytest.mark.parametrize("variant", ["t5", "bart"])
def test_cuda_matches_transformers(variant, hf_torch_model, hf_tokenizer, exported_dir):
    try:
        cuda = runtime.load(exported_dir(variant), provider="cuda")
    except runtime.ProviderUnavailableError as err:
        pytest.skip(f"no working CUDA provider: {err}")
    _, torch_model, pt_inputs, np_inputs = _case(variant, hf_torch_model, hf_tokenizer, exported_dir)
    for options in CORE.values():
        np.testing.assert_array_equal(cuda.generate(np_inputs["input_ids"], np_inputs["attention_mask"], **options),
                                      _torch_generate(torch_model, pt_inputs, options))


@pytest.mark.parametrize("variant", VARIANTS)
def test_defaults_from_generation_config_and_inferred_mask_match_transformers(
        variant, hf_torch_model, hf_tokenizer, exported_dir):
    """No length option and no attention_mask: both sides take generation_config.json's defaults and
    infer the mask from the pad tokens."""
    model, torch_model, pt_inputs, np_inputs = _case(variant, hf_torch_model, hf_tokenizer, exported_dir)
    with torch.no_grad():
        expected = torch_model.generate(pt_inputs["input_ids"]).numpy()
    np.testing.assert_array_equal(model.generate(np_inputs["input_ids"]), expected)


def test_length_beyond_decoder_positions_is_an_option_error(exported_dir):
    model = runtime.load(exported_dir("bart"), provider="cpu")
    limit = model.manifest.max_target_positions
    assert limit is not None
    with pytest.raises(runtime.InvalidOptionError, match="positions"):
        model.generate([[5, 6, 7]], max_new_tokens=limit)


def test_generation_config_option_we_do_not_implement_fails_clearly(exported_dir, tmp_path):
    import json
    import shutil

    from runtime.errors import UnsupportedModelError

    export = tmp_path / "export"
    shutil.copytree(exported_dir("bart"), export)
    manifest = json.loads((export / "s2s.json").read_text())
    manifest["generation_defaults"]["encoder_no_repeat_ngram_size"] = 3
    (export / "s2s.json").write_text(json.dumps(manifest))
    with pytest.raises(UnsupportedModelError, match="encoder_no_repeat_ngram_size=3"):
        runtime.load(export, provider="cpu").generate([[5, 6, 7]])


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(pad_token_id="x"), "pad_token_id"),
    (lambda m: m["states"][0].update(output_name="present.99.decoder.key"), "present.99.decoder.key"),
    (lambda m: m.update(format_version=99), "format version"),
])
def test_inconsistent_manifest_fails_at_load(exported_dir, tmp_path, edit, match):
    import json
    import shutil

    export = tmp_path / "export"
    shutil.copytree(exported_dir("t5"), export)
    manifest = json.loads((export / "s2s.json").read_text())
    edit(manifest)
    (export / "s2s.json").write_text(json.dumps(manifest))
    with pytest.raises(runtime.S2SError, match=match):
        runtime.load(export, provider="cpu")
