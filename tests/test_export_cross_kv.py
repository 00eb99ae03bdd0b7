"""The cross-attention K/V pass (exporter/passes/cross_kv.py) on optimum's own exports of every fixture variant.

Oracles: transformers' `generate` (the runtime on the rewritten directory must produce its tokens),
optimum's first-step decoder (the encoder's new K/V outputs must equal what it emits), and optimum's
graph files (the weights the encoder gains must be exactly those only the first-step decoder held).
"""

from __future__ import annotations

import hashlib
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

import runtime
from exporter.passes.cross_kv import (
    DECODER_FILE,
    ENCODER_FILE,
    CrossAttentionNotMovable,
    move_cross_attention_to_encoder,
)
from runtime.manifest import MANIFEST_NAME
from runtime.optimum_layout import ENCODER_FILE as OPTIMUM_ENCODER_FILE, FIRST_STEP_FILE, WITH_PAST_FILE
from tests.fixtures.hf_models import SAMPLE_TEXTS, VARIANTS

pytestmark = pytest.mark.slow  # exports with optimum

BATCH = SAMPLE_TEXTS[:3]  # three inputs of different lengths -> right padding
SEARCHES = {
    "greedy": dict(num_beams=1, max_new_tokens=16),
    "beam4-nrs2": dict(num_beams=4, num_return_sequences=2, max_new_tokens=12),
}


def _optimum_export(model_dir: Path, out_dir: Path) -> Path:
    from optimum.exporters.onnx import main_export

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optimum's tracing warnings: its own business here
        main_export(str(model_dir), output=out_dir, task="text2text-generation-with-past", do_validation=False)
    return out_dir


@pytest.fixture(scope="module")
def layouts(hf_model_dir, tmp_path_factory):
    """`layouts(variant) -> (optimum_dir, moved_dir)`: optimum's export as written, and a copy rewritten
    by the pass with its manifest written."""
    built: dict[str, tuple[Path, Path]] = {}

    def get(variant: str) -> tuple[Path, Path]:
        if variant not in built:
            root = tmp_path_factory.mktemp(f"cross-kv-{variant}")
            optimum_dir = _optimum_export(hf_model_dir(variant), root / "optimum")
            moved = root / "moved"
            shutil.copytree(optimum_dir, moved)
            move_cross_attention_to_encoder(moved).write(moved)
            built[variant] = (optimum_dir, moved)
        return built[variant]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
def test_layout_and_generate_match_transformers(variant, layouts, hf_torch_model, hf_tokenizer):
    _, moved = layouts(variant)
    assert sorted(p.name for p in moved.glob("*.onnx")) == [DECODER_FILE, ENCODER_FILE]
    manifest = runtime.load(moved, provider="cpu").manifest
    assert (manifest.encoder_file, manifest.decoder_file, manifest.first_step_file, manifest.use_cache_branch) == \
        (ENCODER_FILE, DECODER_FILE, None, None)
    for state in manifest.states:
        if state.kind == "fixed":
            assert (state.init, state.output_name, state.encoder_output) == \
                ("encoder", None, state.input_name.replace("past_key_values", "present"))
        else:
            assert (state.init, state.output_name) == ("empty", state.input_name.replace("past_key_values", "present"))

    pt_inputs = hf_tokenizer(variant)(BATCH, padding=True, return_tensors="pt")
    assert (pt_inputs["attention_mask"] == 0).any(), "the batch must be padded"
    model = runtime.load(moved, provider="cpu", threads=1)
    for options in SEARCHES.values():
        with torch.no_grad():
            expected = hf_torch_model(variant).generate(**pt_inputs, **options, do_sample=False).numpy()
        got = model.generate(pt_inputs["input_ids"].numpy(), pt_inputs["attention_mask"].numpy(), **options)
        np.testing.assert_array_equal(got, expected, err_msg=str(options))


@pytest.mark.parametrize("variant", ["t5", "bart", "pegasus"])
def test_encoder_emits_the_first_step_cross_attention_kv(variant, layouts, hf_tokenizer):
    optimum_dir, moved = layouts(variant)
    batch = hf_tokenizer(variant)(BATCH, padding=True, return_tensors="np")
    ids, mask = batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)
    encoder = ort.InferenceSession(str(moved / ENCODER_FILE), providers=["CPUExecutionProvider"])
    names = [o.name for o in encoder.get_outputs()]
    got = dict(zip(names, encoder.run(names, {"input_ids": ids, "attention_mask": mask})))

    optimum_encoder = ort.InferenceSession(str(optimum_dir / OPTIMUM_ENCODER_FILE), providers=["CPUExecutionProvider"])
    hidden = optimum_encoder.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]
    first_step = ort.InferenceSession(str(optimum_dir / FIRST_STEP_FILE), providers=["CPUExecutionProvider"])
    start = np.zeros((ids.shape[0], 1), dtype=np.int64)
    expected = dict(zip([o.name for o in first_step.get_outputs()], first_step.run(
        None, {"input_ids": start, "encoder_attention_mask": mask, "encoder_hidden_states": hidden})))

    cross_kv = [name for name in expected if name.startswith("present.") and name.endswith(("encoder.key",
                                                                                            "encoder.value"))]
    assert cross_kv and sorted(names) == sorted(["last_hidden_state", *cross_kv])
    np.testing.assert_array_equal(got["last_hidden_state"], hidden)
    for name in cross_kv:
        np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-5, err_msg=name)


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {init.name: numpy_helper.to_array(init) for init in onnx.load(path).graph.initializer}


def _digests(tensors) -> set[str]:
    return {hashlib.sha256(np.ascontiguousarray(t).tobytes()).hexdigest() + str(t.shape) for t in tensors}


@pytest.mark.parametrize("variant", ["t5", "t5-gated", "bart"])
def test_weights_are_stored_once(variant, layouts, hf_torch_model):
    """The encoder gains exactly the matrices only the first-step decoder held (the cross-attention K/V
    projections), and no matrix of the cached decoder (self-attention, feed-forward, cross-attention
    query/output): compared by content, since each file names its tensors its own way."""
    optimum_dir, moved = layouts(variant)
    before = _initializers(optimum_dir / OPTIMUM_ENCODER_FILE)
    after = _initializers(moved / ENCODER_FILE)
    added = [t for name, t in after.items() if name not in before]
    assert set(before) <= set(after)
    with_past = _initializers(optimum_dir / WITH_PAST_FILE)
    first_step_only = _digests(t for t in _initializers(optimum_dir / FIRST_STEP_FILE).values() if t.ndim == 2) - \
        _digests(t for t in with_past.values() if t.ndim == 2)

    added_matrices = [t for t in added if t.ndim == 2]
    config = hf_torch_model(variant).config
    layers = getattr(config, "num_decoder_layers", None) or config.decoder_layers
    assert len(added_matrices) == 2 * layers  # one K and one V projection per decoder layer
    assert _digests(added_matrices) == first_step_only
    assert not _digests(added_matrices) & _digests(with_past.values())
    assert all(t.ndim <= 1 for t in added if t.ndim != 2)  # biases, if the architecture has them
    assert _initializers(moved / DECODER_FILE).keys() == with_past.keys()


def _batch_size_gather(model: onnx.ModelProto, output: str) -> onnx.NodeProto:
    """The first Gather-of-Shape above `output` whose Shape reads a decoder tensor (the batch-size read)."""
    producer = {name: node for node in model.graph.node for name in node.output}
    pending = [output]
    while pending:
        node = producer.get(pending.pop())
        if node is None:
            continue
        source = producer.get(node.input[0]) if node.input else None
        if node.op_type == "Gather" and source is not None and source.op_type == "Shape" and \
                source.input[0] != "encoder_hidden_states":
            return node
        pending.extend(node.input)
    raise AssertionError(f"no batch-size read above {output}")


def test_a_shape_read_beyond_the_batch_is_refused(layouts, tmp_path):
    """If a K/V reshape read the decoder's sequence length, the rewrite would be wrong: the pass refuses
    and leaves the directory as it was."""
    optimum_dir, _ = layouts("t5")
    export_dir = tmp_path / "t5"
    shutil.copytree(optimum_dir, export_dir)
    model = onnx.load(export_dir / FIRST_STEP_FILE)
    gather = _batch_size_gather(model, "present.0.encoder.key")
    gather.input[1] = "index_1"  # read dimension 1 (the decoder's length) instead of the batch
    model.graph.initializer.append(numpy_helper.from_array(np.array(1, dtype=np.int64), "index_1"))
    onnx.save(model, export_dir / FIRST_STEP_FILE)
    files = {p.name: p.stat().st_mtime_ns for p in export_dir.iterdir()}

    with pytest.raises(CrossAttentionNotMovable, match=f"Gather {gather.name!r} reads more of Shape"):
        move_cross_attention_to_encoder(export_dir)
    assert {p.name: p.stat().st_mtime_ns for p in export_dir.iterdir()} == files
    assert not (export_dir / MANIFEST_NAME).exists()


def test_a_merged_only_directory_is_refused(layouts, tmp_path):
    optimum_dir, _ = layouts("bart")
    export_dir = tmp_path / "bart"
    shutil.copytree(optimum_dir, export_dir)
    (export_dir / FIRST_STEP_FILE).unlink()
    with pytest.raises(CrossAttentionNotMovable, match="split graphs"):
        move_cross_attention_to_encoder(export_dir)
