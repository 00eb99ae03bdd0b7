"""exporter/passes/shared_weights.py: a tensor the graphs repeat, stored once and mapped by the sessions.

Tokens are checked against transformers by tests/test_generate_parity.py (every default export has this
pass); here: what the pass writes, that each graph still loads alone, that onnxruntime maps the shared
file rather than copying it (the saving depends on it), and the errors of a damaged directory.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import runtime
from exporter.passes.shared_weights import share_weights
from runtime.errors import ExportDirError
from runtime.manifest import SHARED_WEIGHTS_FILE, Manifest
from tests.fixtures.hf_models import SAMPLE_TEXTS, VARIANTS


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_embedding_table_is_stored_once_and_named_by_both_graphs(variant, exported_dir):
    out = exported_dir(variant)
    manifest = Manifest.read(out)
    assert "shared-weights" in manifest.passes
    table = [w for w in manifest.shared_weights if w.shape == (manifest.vocab_size, w.shape[1])]
    assert len(table) == 1 and set(table[0].names) == {manifest.encoder_file, manifest.decoder_file}
    data = np.fromfile(out / SHARED_WEIGHTS_FILE, dtype=table[0].dtype)
    assert (out / SHARED_WEIGHTS_FILE).stat().st_size >= table[0].offset + table[0].nbytes
    for graph_file, name in table[0].names.items():
        graph = onnx.load(out / graph_file, load_external_data=False).graph
        tensor = next(t for t in graph.initializer if t.name == name)
        assert tensor.data_location == onnx.TensorProto.EXTERNAL and not tensor.raw_data
        where = {e.key: e.value for e in tensor.external_data}
        assert where == {"location": SHARED_WEIGHTS_FILE, "offset": str(table[0].offset),
                         "length": str(table[0].nbytes)}
    assert all(w.offset % 4096 == 0 for w in manifest.shared_weights)  # what onnxruntime maps, not copies
    start = table[0].offset // data.itemsize
    assert np.abs(data[start:start + table[0].nbytes // data.itemsize]).max() > 0  # real weights, not a hole


def test_each_graph_still_loads_alone_and_computes_what_the_runtime_does(exported_dir):
    out = exported_dir("t5")
    model = runtime.load(out, provider="cpu", io_binding=False)
    ids, mask = model.encode_text(SAMPLE_TEXTS[:2])
    plain = ort.InferenceSession(str(out / model.graphs.manifest.encoder_file), providers=["CPUExecutionProvider"])
    names = [o.name for o in plain.get_outputs()]
    alone = plain.run(names, {"input_ids": ids, "attention_mask": mask})
    ours = model.graphs.encoder.run_plain({"input_ids": ids, "attention_mask": mask}, names)
    for name, value in zip(names, alone):
        np.testing.assert_array_equal(ours[name], value)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")
def test_the_loaded_model_maps_the_shared_file_instead_of_copying_it(exported_dir):
    """onnxruntime maps external data whose offset is page-aligned (its model_saving_options.h): the shared
    table is the file's pages, not a copy per session."""
    out = exported_dir("t5")
    model = runtime.load(out, provider="cpu")
    mapped = [line for line in Path("/proc/self/maps").read_text().splitlines()
              if line.endswith(str((out / SHARED_WEIGHTS_FILE).resolve()))]
    assert mapped, "shared_weights.bin is not mapped: each session copied the table"
    assert model.generate_text(SAMPLE_TEXTS[:1], max_new_tokens=3)


def test_nothing_is_written_when_no_tensor_repeats(exported_dir, tmp_path):
    manifest = Manifest.read(exported_dir("t5"))
    alone = onnx.load(exported_dir("t5") / manifest.encoder_file)  # its table read back in
    onnx.save(alone, tmp_path / "encoder.onnx")
    before = (tmp_path / "encoder.onnx").read_bytes()
    assert share_weights(tmp_path, ["encoder.onnx"]) == ()
    assert not (tmp_path / SHARED_WEIGHTS_FILE).exists()
    assert (tmp_path / "encoder.onnx").read_bytes() == before


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_or_short_shared_file_is_one_clear_error(exported_dir, tmp_path, damage):
    out = tmp_path / "export"
    shutil.copytree(exported_dir("t5"), out)
    path = out / SHARED_WEIGHTS_FILE
    if damage == "missing":
        path.unlink()
    else:
        path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ExportDirError, match=f"{SHARED_WEIGHTS_FILE}.*(missing|truncated).*re-export"):
        runtime.load(out, provider="cpu")


def test_the_manifest_refuses_a_shared_weight_naming_another_graph(exported_dir):
    raw = json.loads((exported_dir("t5") / "s2s.json").read_text())
    raw["shared_weights"][0]["names"] = {"other.onnx": "x"}
    with pytest.raises(ExportDirError, match="shared weight .* must map graph files"):
        Manifest.from_dict(raw)


def test_a_repeated_tensor_of_a_type_the_manifest_does_not_list_stays_in_its_graphs(tmp_path):
    """Two graphs repeating a float32 and a float64 table: the float32 one is shared, the float64 one
    (not in SHARED_WEIGHT_DTYPES, which the manifest's check would refuse) stays inline in both."""
    from onnx import helper, numpy_helper

    tables = {"f32": np.arange(2048, dtype=np.float32), "f64": np.arange(1024, dtype=np.float64)}
    for name in ("a.onnx", "b.onnx"):
        inits = [numpy_helper.from_array(values, key) for key, values in tables.items()]
        nodes = [helper.make_node("Identity", [key], [f"out_{key}"]) for key in tables]
        outputs = [helper.make_tensor_value_info(f"out_{key}", inits[i].data_type, [v.size])
                   for i, (key, v) in enumerate(tables.items())]
        onnx.save(helper.make_model(helper.make_graph(nodes, "g", [], outputs, inits)), tmp_path / name)
    shared = share_weights(tmp_path, ["a.onnx", "b.onnx"])
    assert [(w.dtype, w.names) for w in shared] == [("float32", {"a.onnx": "f32", "b.onnx": "f32"})]
    for name in ("a.onnx", "b.onnx"):
        inits = {t.name: t for t in onnx.load(tmp_path / name, load_external_data=False).graph.initializer}
        assert inits["f32"].data_location == onnx.TensorProto.EXTERNAL
        assert inits["f64"].data_location == onnx.TensorProto.DEFAULT and inits["f64"].raw_data
