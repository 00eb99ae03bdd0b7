"""Directories written by plain optimum (`optimum-cli export onnx` / `main_export`), with no s2s.json:
the manifest is derived from the graphs, and the runtime runs them token-identical to transformers.

Both of optimum's layouts: the merged decoder (what main_export writes by default) and the split pair
(decoder_model.onnx for step 0, decoder_with_past_model.onnx after it), as older exports ship.
"""

from __future__ import annotations

import shutil
import warnings

import numpy as np
import pytest
import torch

import runtime
from runtime.errors import ExportDirError
from runtime.manifest import MANIFEST_NAME
from runtime.optimum_layout import manifest_from_optimum_dir
from tests.fixtures.hf_models import SAMPLE_TEXTS

pytestmark = pytest.mark.slow  # exports with optimum


@pytest.fixture(scope="module")
def optimum_exports(hf_model_dir, tmp_path_factory):
    """{layout: directory} of the t5 fixture exported by optimum's main_export: "merged" as written,
    "split" the same files without the merged decoder."""
    from optimum.exporters.onnx import main_export

    merged = tmp_path_factory.mktemp("optimum") / "t5"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optimum's tracing warnings: its own business here
        main_export(str(hf_model_dir("t5")), output=merged, task="text2text-generation-with-past",
                    do_validation=False)
    split = merged.parent / "t5-split"
    shutil.copytree(merged, split)
    (split / "decoder_model_merged.onnx").unlink()
    return {"merged": merged, "split": split}


@pytest.mark.parametrize("layout", ["merged", "split"])
def test_manifest_is_derived_from_the_graphs(layout, optimum_exports, hf_torch_model):
    export_dir = optimum_exports[layout]
    assert not (export_dir / MANIFEST_NAME).exists()
    manifest = manifest_from_optimum_dir(export_dir)
    config = hf_torch_model("t5").config
    assert manifest.source == "optimum-dir"
    if layout == "merged":
        assert (manifest.decoder_file, manifest.first_step_file, manifest.use_cache_branch) == \
            ("decoder_model_merged.onnx", None, "use_cache_branch")
    else:
        assert (manifest.decoder_file, manifest.first_step_file, manifest.use_cache_branch) == \
            ("decoder_with_past_model.onnx", "decoder_model.onnx", None)
    assert len(manifest.states) == 4 * config.num_decoder_layers
    for state in manifest.states:
        kind = "grows" if ".decoder." in state.input_name else "fixed"
        assert (state.kind, state.batch_axis, state.seq_axis) == (kind, 0, 2)
        # Fixed (cross-attention) states come from step 0's graph; in the split layout the with-past
        # graph does not re-emit them, and the runtime keeps them once set.
        assert state.output_name == state.input_name.replace("past_key_values", "present")
    assert (manifest.pad_token_id, manifest.eos_token_ids, manifest.decoder_start_token_id) == \
        (config.pad_token_id, (config.eos_token_id,), config.decoder_start_token_id)
    assert manifest.vocab_size == config.vocab_size
    assert manifest.max_source_positions is None  # T5: relative positions
    assert manifest.tokenizer_file == "tokenizer.json"


@pytest.mark.parametrize("options", [dict(num_beams=1, max_new_tokens=12), dict(num_beams=3, max_new_tokens=10)])
@pytest.mark.parametrize("layout", ["merged", "split"])
def test_runtime_runs_an_optimum_directory(layout, options, optimum_exports, hf_torch_model, hf_tokenizer):
    batch = hf_tokenizer("t5")(SAMPLE_TEXTS[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = hf_torch_model("t5").generate(**batch, **options, do_sample=False).numpy()
    model = runtime.load(optimum_exports[layout], provider="cpu")
    got = model.generate(batch["input_ids"].numpy(), batch["attention_mask"].numpy(), **options)
    np.testing.assert_array_equal(got, expected)


def test_a_directory_without_a_cached_decoder_is_refused(optimum_exports, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(optimum_exports["split"], partial)
    (partial / "decoder_with_past_model.onnx").unlink()
    with pytest.raises(ExportDirError, match="no cached decoder.*text2text-generation-with-past"):
        runtime.load(partial, provider="cpu")
