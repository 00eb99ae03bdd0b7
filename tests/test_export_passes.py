"""The options that change the numbers: --quantize int8, --dtype fp16 (with T5's overflow), --optimize.

Each export is validated against the fp32 PyTorch model with the looser tolerance exporter.validate
states (TOLERANCES), and the runtime must decode the reduced-precision graphs exactly as transformers'
`generate` does over the same graphs (the validation's oracle for fp16/int8). The manifest must
record what was done.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from exporter import export
from exporter.validate import TOLERANCES
from runtime.errors import ValidationError
from runtime.manifest import Manifest


def _op_types(path):
    def walk(graph):
        for node in graph.node:
            yield node.op_type
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.GRAPH:
                    yield from walk(attribute.g)

    return set(walk(onnx.load(path).graph))


def _rebuilt_t5(hf_model_dir, out_dir, change):
    """A copy of the t5 fixture (tokenizer and config files) whose torch model `change` edits in place."""
    import torch
    from transformers import AutoModelForSeq2SeqLM

    source = hf_model_dir("t5")
    shutil.copytree(source, out_dir)
    model = AutoModelForSeq2SeqLM.from_pretrained(source).eval()
    with torch.no_grad():
        change(model)
    model.save_pretrained(out_dir)
    return out_dir, model


@pytest.fixture(scope="module")
def well_conditioned_t5(hf_model_dir, tmp_path_factory):
    """The t5 fixture re-initialized at transformers' default init. The fixtures' large init (chosen so
    that greedy outputs vary) makes activations that per-tensor int8 cannot represent (logits 40-65% off);
    at the default init, like trained models, int8 stays within a few percent."""
    import torch

    def default_init(model):
        model.config.initializer_factor = 1.0
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model.apply(model._init_weights)

    return _rebuilt_t5(hf_model_dir, tmp_path_factory.mktemp("t5-default-init") / "model", default_init)[0]


def test_int8_export_is_validated_and_recorded(well_conditioned_t5, tmp_path):
    report = export(well_conditioned_t5, tmp_path / "out", quantize="int8")
    validation = report.validation
    assert validation.tolerance == TOLERANCES["int8"]  # 10% of the largest |PyTorch value|
    assert all(c.ok for c in validation.comparisons)
    assert not validation.tokens_required  # vs PyTorch fp32: reported, not required
    assert validation.graph_tokens is not None and (validation.graph_tokens == validation.export_tokens).all()
    manifest = Manifest.read(tmp_path / "out")
    assert (manifest.precision, manifest.passes) == ("int8", ("int8-dynamic",))
    for graph in (manifest.encoder_file, manifest.decoder_file):
        assert {"DynamicQuantizeLinear", "MatMulInteger"} <= _op_types(tmp_path / "out" / graph)


def test_int8_beyond_tolerance_fails_and_leaves_nothing(hf_model_dir, tmp_path):
    with pytest.raises(ValidationError, match=r"differ from PyTorch by up to .* above the allowed 1e-06.*--atol"):
        export(hf_model_dir("t5"), tmp_path / "out", quantize="int8", atol=1e-6)
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def overflowing_t5(hf_model_dir, tmp_path_factory):
    """The t5 fixture with the feed-forward output projection (`wo`) of the first encoder and decoder
    block scaled up 10000x: its output then exceeds float16's range (65504), the failure transformers
    works around by keeping T5's `wo` in fp32. Returns the checkpoint and the largest |wo output|
    PyTorch (fp32) computes on the fixture texts."""
    import torch

    def scale_wo(model):
        for stack in (model.encoder, model.decoder):
            stack.block[0].layer[-1].DenseReluDense.wo.weight.mul_(10000.0)

    out_dir, model = _rebuilt_t5(hf_model_dir, tmp_path_factory.mktemp("t5-overflow") / "model", scale_wo)
    from transformers import AutoTokenizer

    from exporter.sources.hf import SAMPLE_TEXTS

    peak = []
    hooks = [stack.block[0].layer[-1].DenseReluDense.wo.register_forward_hook(
        lambda module, args, output: peak.append(float(output.abs().max()))) for stack in (model.encoder, model.decoder)]
    batch = AutoTokenizer.from_pretrained(out_dir)(list(SAMPLE_TEXTS), padding=True, return_tensors="pt")
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=4, num_beams=1, do_sample=False)
    for hook in hooks:
        hook.remove()
    return out_dir, max(peak)


def test_fp16_t5_keeps_what_overflows_in_fp32(overflowing_t5, tmp_path):
    checkpoint, fp32_peak = overflowing_t5
    assert fp32_peak > float(np.finfo(np.float16).max)  # the model really overflows float16
    report = export(checkpoint, tmp_path / "out", dtype="fp16")
    validation = report.validation
    assert validation.tolerance == TOLERANCES["fp16"]  # 10% of the largest |PyTorch value|
    assert all(c.ok and np.isfinite(c.max_abs_diff) for c in validation.comparisons)
    assert validation.graph_tokens is not None and (validation.graph_tokens == validation.export_tokens).all()
    manifest = report.manifest
    assert (manifest.precision, manifest.passes) == ("fp16", ("fp16",))
    assert any("kept in fp32" in note for note in report.notes)
    # Weights, cache and logits are float16; only the kept parts compute in float32.
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / "out" / manifest.decoder_file), providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in session.get_inputs()} | {o.name: o.type for o in session.get_outputs()}
    assert types["logits"] == types["past_key_values.0.decoder.key"] == "tensor(float16)"


@pytest.mark.parametrize("variant, fused", [("t5", "SkipSimplifiedLayerNormalization"),
                                            ("bart", "SkipLayerNormalization")])
def test_optimize_fuses_and_validates(variant, fused, hf_model_dir, tmp_path):
    report = export(hf_model_dir(variant), tmp_path / "out", optimize=True)
    validation = report.validation
    assert validation.tolerance == TOLERANCES["optimize"]
    assert all(c.ok for c in validation.comparisons) and validation.tokens_match
    assert report.manifest.passes == ("optimize",)
    assert fused in _op_types(tmp_path / "out" / report.manifest.decoder_file)
    # T5's own fusion family would emit RelativePositionBias, which the CPU provider cannot load.
    assert "RelativePositionBias" not in _op_types(tmp_path / "out" / report.manifest.decoder_file)
