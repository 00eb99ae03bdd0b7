"""The offline fixtures are fit for parity tests: real tokenizers, consistent ids, non-trivial output.

The oracle here is transformers itself: a fixture whose greedy output is one token forever, or
whose tokenizer.json encodes differently from its transformers tokenizer, would let a broken
runtime pass every parity test.
"""

from __future__ import annotations

import pytest

from tests.fixtures.hf_models import SAMPLE_TEXTS, VARIANTS, build_hf_model

MAX_NEW_TOKENS = 20


@pytest.mark.parametrize("variant", VARIANTS)
def test_tokenizer_round_trips_sample_texts(variant, hf_tokenizer):
    # The sentencepiece models normalise with NFKC and collapse runs of spaces; SAMPLE_TEXTS are
    # ASCII with single spaces, so decoding gives them back exactly (byte-level BPE always does).
    tokenizer = hf_tokenizer(variant)
    for text in SAMPLE_TEXTS:
        ids = tokenizer(text).input_ids
        assert tokenizer.unk_token_id not in ids, f"{variant}: <unk> in {text!r}"
        assert ids[-1] == tokenizer.eos_token_id, f"{variant}: encoding of {text!r} does not end with EOS"
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


@pytest.mark.parametrize("variant", VARIANTS)
def test_tokenizer_json_matches_transformers(variant, hf_model_dir, hf_tokenizer):
    """The runtime tokenizes with the `tokenizers` package: its ids must be transformers' ids,
    fast and slow alike. Marian ships no tokenizer.json (the runtime falls back to transformers)."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    checkpoint = hf_model_dir(variant)
    tokenizer_json = checkpoint / "tokenizer.json"
    if variant == "marian":
        assert not tokenizer_json.exists()
        return
    runtime_tokenizer = Tokenizer.from_file(str(tokenizer_json))
    slow = AutoTokenizer.from_pretrained(checkpoint, use_fast=False)
    fast = hf_tokenizer(variant)
    assert fast.is_fast and not slow.is_fast
    for text in SAMPLE_TEXTS:
        expected = slow(text).input_ids
        assert fast(text).input_ids == expected
        assert runtime_tokenizer.encode(text).ids == expected


@pytest.mark.parametrize("variant", VARIANTS)
def test_special_ids_and_vocab_size_agree(variant, hf_tokenizer, hf_torch_model):
    tokenizer, model = hf_tokenizer(variant), hf_torch_model(variant)
    config, generation_config = model.config, model.generation_config
    assert len(tokenizer) == config.vocab_size == model.get_output_embeddings().weight.shape[0]
    assert config.pad_token_id == tokenizer.pad_token_id == generation_config.pad_token_id
    assert config.eos_token_id == tokenizer.eos_token_id == generation_config.eos_token_id
    assert config.decoder_start_token_id == generation_config.decoder_start_token_id


@pytest.mark.parametrize("num_beams", [1, 4])
@pytest.mark.parametrize("variant", VARIANTS)
def test_generation_is_non_trivial(variant, num_beams, hf_tokenizer, hf_torch_model):
    """Rows differ, few end at once, some end early (finished-row handling), some run to the limit."""
    tokenizer, model = hf_tokenizer(variant), hf_torch_model(variant)
    batch = tokenizer(SAMPLE_TEXTS, return_tensors="pt", padding=True)
    sequences = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS, num_beams=num_beams,
                               do_sample=False)
    new_tokens = sequences[:, 1:].tolist()  # after the decoder start token
    eos_id = model.config.eos_token_id
    first_free = 1 if model.generation_config.forced_bos_token_id is not None else 0
    # The last token may be forced to EOS (forced_eos_token_id): only earlier EOS count as early.
    ends_early = [eos_id in row[:MAX_NEW_TOKENS - 1] for row in new_tokens]
    ends_at_once = [len(row) > first_free and row[first_free] == eos_id for row in new_tokens]
    outputs = "\n".join(map(str, new_tokens))

    assert len(set(map(tuple, new_tokens))) == len(SAMPLE_TEXTS), f"{variant}: rows repeat\n{outputs}"
    assert sum(ends_at_once) <= 1, f"{variant}: rows end at their first step\n{outputs}"
    assert any(ends_early), f"{variant}: no row ends before {MAX_NEW_TOKENS} tokens\n{outputs}"
    assert ends_early.count(False) >= 2, f"{variant}: < 2 rows run {MAX_NEW_TOKENS} tokens\n{outputs}"


def test_build_is_deterministic(tmp_path, hf_model_dir):
    """Same files every build (BART: the byte-level BPE trainer and the EOS boost included)."""
    rebuilt = build_hf_model("bart", tmp_path / "bart")
    original = hf_model_dir("bart")
    names = sorted(path.name for path in original.iterdir())
    assert names == sorted(path.name for path in rebuilt.iterdir())
    for name in names:
        assert (rebuilt / name).read_bytes() == (original / name).read_bytes(), name


def test_unknown_variant_names_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="t5-gated"):
        build_hf_model("gpt2", tmp_path)
