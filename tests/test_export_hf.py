"""s2s-export on every Hugging Face fixture variant: the export validates against PyTorch, holds what
the issue lists, and its manifest says what the graphs and config files say.

Oracles: the validation itself compares logits with PyTorch and greedy tokens with transformers'
`generate` on the torch model (the default layout, encoder.onnx + decoder.onnx, is not one optimum's
ORTModelForSeq2SeqLM loads, so there is no comparison over the graphs); the manifest is checked
against the transformers config and the graphs' declared IO.
"""

from __future__ import annotations

import json

import onnxruntime as ort
import pytest

from exporter import export
from exporter.passes.cross_kv import DECODER_FILE, ENCODER_FILE
from exporter.validate import TOLERANCES
from runtime.manifest import MANIFEST_NAME, Manifest
from tests.fixtures.hf_models import VARIANTS

pytestmark = pytest.mark.slow  # exports every fixture variant

# Tokenizer files each fixture ships, which the export must carry (Marian has no fast tokenizer).
TOKENIZER_FILES = {
    "t5": ("tokenizer.json", "spiece.model"),
    "t5-gated": ("tokenizer.json", "spiece.model"),
    "bart": ("tokenizer.json", "vocab.json", "merges.txt"),
    "bart-scaled": ("tokenizer.json", "vocab.json", "merges.txt"),
    "marian": ("source.spm", "target.spm", "vocab.json"),
    "pegasus": ("tokenizer.json", "spiece.model"),
}


@pytest.fixture(scope="module")
def validated_export(hf_model_dir, tmp_path_factory):
    """`validated_export(variant) -> (report, steps)`: a default (fp32, validated) export, once per variant."""
    done = {}

    def get(variant):
        if variant not in done:
            steps = []
            out = tmp_path_factory.mktemp(f"validated-{variant}") / "out"
            report = export(hf_model_dir(variant), out, progress=lambda step, seconds: steps.append((step, seconds)))
            done[variant] = report, steps
        return done[variant]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_validates_against_pytorch(variant, validated_export):
    report, _ = validated_export(variant)
    validation = report.validation
    assert [c.what for c in validation.comparisons] == [
        "encoder output", "first decoder step logits", "cached decoder step logits"]
    for comparison in validation.comparisons:  # tolerance: TOLERANCES["fp32"], 1e-4 + 0.01% of the largest value
        assert comparison.ok and comparison.max_abs_diff <= comparison.allowed
    assert validation.tolerance == TOLERANCES["fp32"]
    assert validation.tokens_required and validation.tokens_match
    assert validation.graph_tokens is None  # optimum cannot load the cross-kv layout
    assert validation.export_tokens.shape[1] > 2  # a few tokens were really generated


@pytest.mark.parametrize("variant", VARIANTS)
def test_export_directory_holds_what_the_runtime_needs(variant, validated_export, hf_torch_model):
    report, _ = validated_export(variant)
    out = report.output
    names = {p.name for p in out.iterdir()}
    assert {ENCODER_FILE, DECODER_FILE, MANIFEST_NAME, "config.json", "generation_config.json"} <= names
    assert set(TOKENIZER_FILES[variant]) <= names
    # Two graphs: the cross-attention K/V moved into the encoder, optimum's graphs were removed.
    assert sorted(n for n in names if n.endswith(".onnx")) == sorted([DECODER_FILE, ENCODER_FILE])
    assert not [n for n in names if n.startswith(".")]  # no staging leftovers

    config = hf_torch_model(variant).config
    generation = hf_torch_model(variant).generation_config
    manifest = Manifest.read(out)
    assert manifest == report.manifest
    assert (manifest.source, manifest.precision) == ("hf", "fp32")
    assert manifest.passes == ("cross-kv", "kv-buffer", "packed-qkv", "greedy-head-screened", "shared-weights")
    assert manifest.model_type == config.model_type
    assert manifest.decoder_start_token_id == generation.decoder_start_token_id
    assert manifest.pad_token_id == generation.pad_token_id
    assert manifest.eos_token_ids == (generation.eos_token_id,)
    assert manifest.vocab_size == config.vocab_size
    # T5 has relative positions (no limit); the others learned or sinusoidal ones, shared by both sides.
    positions = None if config.model_type == "t5" else config.max_position_embeddings
    assert (manifest.max_source_positions, manifest.max_target_positions) == (positions, positions)
    assert manifest.tokenizer_file == ("tokenizer.json" if "tokenizer.json" in TOKENIZER_FILES[variant] else None)
    assert manifest.use_cache_branch is None and manifest.first_step_file is None
    assert not any("merged decoder layout" in note for note in report.notes)  # the pass did not refuse
    assert {"torch", "transformers", "optimum", "onnx"} <= set(manifest.versions)
    assert manifest.generation_defaults["eos_token_id"] == generation.eos_token_id


@pytest.mark.parametrize("variant", ["t5", "bart"])
def test_manifest_states_follow_the_graphs(variant, validated_export, hf_torch_model):
    """One buffer state per self-attention K/V of each decoder layer (written in place, bound to the
    matching `present` output), and one fixed per cross-attention K/V, taken from the encoder output of
    the same name; batch on axis 0 and sequence on axis 2."""
    report, _ = validated_export(variant)
    manifest = report.manifest
    decoder = ort.InferenceSession(str(report.output / manifest.decoder_file), providers=["CPUExecutionProvider"])
    encoder = ort.InferenceSession(str(report.output / manifest.encoder_file), providers=["CPUExecutionProvider"])
    decoder_inputs = {i.name for i in decoder.get_inputs()}
    decoder_outputs = {o.name for o in decoder.get_outputs()}
    encoder_outputs = {o.name for o in encoder.get_outputs()}
    layers = hf_torch_model(variant).config.num_decoder_layers if variant == "t5" else \
        hf_torch_model(variant).config.decoder_layers
    assert len(manifest.states) == 4 * layers
    for state in manifest.states:
        attention = state.input_name.split(".")[2]
        assert state.kind == {"decoder": "buffer", "encoder": "fixed"}[attention]
        assert state.input_name in decoder_inputs
        present = state.input_name.replace("past_key_values", "present")
        if state.kind == "buffer":
            assert (state.output_name, state.init, state.encoder_output) == (present, "empty", None)
            assert state.output_name in decoder_outputs
        else:  # computed once by the encoder, never re-emitted by the decoder
            assert (state.output_name, state.init, state.encoder_output) == (None, "encoder", present)
            assert state.encoder_output in encoder_outputs and present not in decoder_outputs
        assert (state.batch_axis, state.seq_axis) == (0, 2)


def test_manifest_round_trips(validated_export):
    """s2s.json is the manifest the export returned, and survives JSON unchanged."""
    report, _ = validated_export("marian")
    manifest = Manifest.read(report.output)
    assert manifest == report.manifest
    assert Manifest.from_dict(json.loads(json.dumps(manifest.to_dict()))) == manifest


def test_progress_reports_each_step_with_its_time(validated_export):
    report, steps = validated_export("t5")
    started = [step for step, seconds in steps if seconds is None]
    finished = [step for step, seconds in steps if seconds is not None]
    assert started == finished == [name for name, _ in report.timings]
    for expected in ("load model", "export encoder", "export decoder (first step)", "export decoder (cached steps)",
                     "validate", "move into place"):
        assert expected in finished
    assert all(seconds >= 0 for _, seconds in report.timings)


def test_refused_cross_kv_pass_keeps_optimums_merged_layout(hf_model_dir, tmp_path, monkeypatch):
    """Where the cross-attention pass refuses, the export says why and merges the decoders instead;
    that layout is validated by transformers' `generate` over the graphs as well."""
    from exporter.passes import cross_kv

    def refuse(export_dir):
        raise cross_kv.CrossAttentionNotMovable("refused by the test")

    monkeypatch.setattr(cross_kv, "move_cross_attention_to_encoder", refuse)
    report = export(hf_model_dir("t5"), tmp_path / "out")
    assert any("merged decoder layout" in note and "refused by the test" in note for note in report.notes)
    names = {p.name for p in report.output.iterdir()}
    assert sorted(n for n in names if n.endswith(".onnx")) == ["decoder_model_merged.onnx", "encoder_model.onnx"]
    manifest = report.manifest
    assert manifest.passes == ("shared-weights",) and manifest.use_cache_branch == "use_cache_branch"
    validation = report.validation
    assert validation.tokens_match
    assert validation.graph_tokens is not None and (validation.graph_tokens == validation.export_tokens).all()
