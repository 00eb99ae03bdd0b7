"""exporter/passes/kv_buffer.py and the runtime's `buffer` states.

The oracle for tokens is transformers (tests/test_generate_parity.py runs every architecture through
the default export, which has this pass); here the same model exported without the pass (optimum's
Concat cache) is the second oracle, and the graph itself is checked: one GroupQueryAttention per layer,
no Concat on the cache, the buffer written in place.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

import runtime
from exporter.passes.kv_buffer import KVBufferNotApplicable, use_kv_buffers
from runtime.manifest import SEQLENS_K, TOTAL_SEQUENCE_LENGTH, Manifest
from tests.fixtures.hf_models import SAMPLE_TEXTS, VARIANTS

OPTIONS = [dict(num_beams=1, max_new_tokens=12), dict(num_beams=4, max_new_tokens=12),
           dict(num_beams=3, num_return_sequences=2, max_new_tokens=10, no_repeat_ngram_size=2)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_layer_attends_through_one_in_place_node(variant, exported_dir):
    out = exported_dir(variant)
    manifest = Manifest.read(out)
    assert "kv-buffer" in manifest.passes
    graph = onnx.load(out / manifest.decoder_file).graph
    buffers = [s for s in manifest.states if s.kind == "buffer"]
    attention = [n for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert len(buffers) == 2 * len(attention) > 0
    for node in attention:
        past_key, past_value = node.input[3:5]
        assert (node.input[5], node.input[6]) == (SEQLENS_K, TOTAL_SEQUENCE_LENGTH)
        # the node reads each cache and writes the matching present: the runtime binds both to one buffer
        by_input = {s.input_name: s.output_name for s in buffers}
        assert list(node.output[1:]) == [by_input[past_key], by_input[past_value]]
    cache_inputs = {s.input_name for s in buffers}
    assert not [n for n in graph.node if n.op_type == "Concat" and set(n.input) & cache_inputs]


@pytest.mark.parametrize("variant", ["t5", "bart", "marian"])
def test_same_tokens_as_the_concat_cache(variant, exported_dir, hf_tokenizer):
    buffered = runtime.load(exported_dir(variant), provider="cpu")
    concat = runtime.load(exported_dir(variant, kv_buffer=False), provider="cpu")
    assert not [s for s in concat.manifest.states if s.kind == "buffer"]
    batch = hf_tokenizer(variant)(SAMPLE_TEXTS[:3], return_tensors="np", padding=True)
    for options in OPTIONS:
        expected = concat.generate_with_scores(batch["input_ids"], batch["attention_mask"], **options)
        got = buffered.generate_with_scores(batch["input_ids"], batch["attention_mask"], **options)
        np.testing.assert_array_equal(got.sequences, expected.sequences, err_msg=str(options))
        if expected.scores is not None:
            np.testing.assert_allclose(got.scores, expected.scores, rtol=0, atol=1e-5)


def test_greedy_rows_that_finish_leave_their_buffers(exported_dir, hf_tokenizer):
    """Greedy drops finished rows (a `take` of the buffers, written positions only): each row of a padded
    batch equals that input generated alone."""
    model = runtime.load(exported_dir("bart"), provider="cpu")
    batch = hf_tokenizer("bart")(SAMPLE_TEXTS[:4], return_tensors="np", padding=True)
    together = model.generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=16)
    for row in range(4):
        length = int(batch["attention_mask"][row].sum())
        alone = model.generate(batch["input_ids"][row:row + 1, :length], max_new_tokens=16)
        np.testing.assert_array_equal(together[row, :alone.shape[1]], alone[0])


@pytest.mark.parametrize("num_beams", [1, 4])
def test_steady_steps_rebind_nothing_and_keep_the_tokens(num_beams, exported_dir, hf_tokenizer, monkeypatch):
    """Once every output is written in place, a step only writes the ids and positions into pinned arrays
    and runs (CachedDecoder._rerun): the full feed-and-bind path runs again only after a state became
    another object (rows dropped); beam search's ranking reruns one binding too (BoundBeamCandidates). Tokens
    equal the plain (io_binding=False) runs'."""
    from runtime.sessions import Binding

    model = runtime.load(exported_dir("t5"), provider="cpu")
    calls = {"run": 0, "rerun": 0}  # the decoder's (the helper graphs of a beam search have bindings too)
    for name in calls:
        original = getattr(Binding, name)
        monkeypatch.setattr(Binding, name, lambda self, *a, _f=original, _n=name, **k: (
            calls.__setitem__(_n, calls[_n] + (self.graph.name == model.manifest.decoder_file)),
            _f(self, *a, **k))[1])
    from runtime.tensor_ops import BoundBeamCandidates

    bound = []  # beam search's ranking of the steady step's logits: bound once, then rerun
    original_run = BoundBeamCandidates.run
    monkeypatch.setattr(BoundBeamCandidates, "run", lambda self, *a: (bound.append(self), original_run(self, *a))[1])
    helper_runs = {"run": 0, "rerun": 0}  # the ranking's binding: run once per binding, then rerun
    for name in helper_runs:
        original = getattr(Binding, name)
        monkeypatch.setattr(Binding, name, lambda self, *a, _f=original, _n=name, **k: (
            helper_runs.__setitem__(_n, helper_runs[_n] + self.graph.name.startswith("beam_candidates")),
            _f(self, *a, **k))[1])
    batch = hf_tokenizer("t5")(SAMPLE_TEXTS[:1], return_tensors="np", padding=True)
    options = dict(num_beams=num_beams, max_new_tokens=12, min_new_tokens=12)
    got = model.generate(batch["input_ids"], **options)
    assert calls["run"] <= 3 and calls["rerun"] >= 12 - calls["run"], calls
    if num_beams > 1:  # one binding while the logits and shapes stay, every steady step through it
        assert len(bound) >= 12 - calls["run"] and len({id(b) for b in bound}) <= 2, len(bound)
        # bound anew at MinLength's end only (its bans change)
        assert helper_runs["run"] <= 3 and helper_runs["rerun"] >= len(bound) - 3, helper_runs
    plain = runtime.load(exported_dir("t5"), provider="cpu", io_binding=False)
    np.testing.assert_array_equal(got, plain.generate(batch["input_ids"], **options))


def test_a_decoder_without_the_pattern_is_left_as_it_was(exported_dir, tmp_path):
    """The Concat-cache export with its attention's softmax removed no longer matches: the pass refuses,
    naming the cache, and the file is byte-identical."""
    out = tmp_path / "export"
    shutil.copytree(exported_dir("t5", kv_buffer=False), out)
    manifest = Manifest.read(out)
    path = out / manifest.decoder_file
    model = onnx.load(path)
    softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
    softmax.op_type = "Sigmoid"
    del softmax.attribute[:]
    onnx.save(model, path)
    before = path.read_bytes()
    with pytest.raises(KVBufferNotApplicable, match="between the scores and the softmax"):
        use_kv_buffers(out, manifest)
    assert path.read_bytes() == before



@pytest.mark.slow
def test_export_notes_a_refusal_and_fails_only_when_the_pass_is_required(hf_model_dir, tmp_path, monkeypatch):
    from exporter import export
    from exporter.errors import GraphPassError
    from exporter.passes import kv_buffer

    def refuse(export_dir, manifest):
        raise KVBufferNotApplicable("refused by the test")

    monkeypatch.setattr(kv_buffer, "use_kv_buffers", refuse)
    report = export(hf_model_dir("t5"), tmp_path / "auto", validate=False)
    assert "kv-buffer" not in report.manifest.passes
    assert any("kv-buffer: not applied (refused by the test)" in note for note in report.notes)
    with pytest.raises(GraphPassError, match="refused by the test"):
        export(hf_model_dir("t5"), tmp_path / "required", validate=False, kv_buffer=True)
    assert not (tmp_path / "required").exists()  # nothing half-written


def test_greedy_pinned_steps_keep_the_tokens(exported_dir, hf_tokenizer, monkeypatch):
    """Greedy's steady steps drive the decoder's PinnedStep (one argmax a step, written where the next
    step reads its ids); at a row that ends or a stop row the general loop runs one step and the pinned
    steps go on with the rows left, and a step where a rule does more than ban (BART's forced BOS and
    EOS) is the general loop's. Tokens equal the
    plain (io_binding=False, no pinned step) runs' in every hand-over: min_new_tokens (a shared ban),
    rows ending at different steps, a second EOS id (banned by min_new_tokens, then ending its row),
    stop rows."""
    from dataclasses import replace

    from runtime.decoder import CachedDecoder

    model = runtime.load(exported_dir("bart"), provider="cpu")
    plain = runtime.load(exported_dir("bart"), provider="cpu", io_binding=False)
    assert model.options().forced_bos_token_id is not None and model.options().forced_eos_token_id is not None
    pinned_runs = []
    original = CachedDecoder.pinned

    def counted(self):
        pinned = original(self)
        return None if pinned is None else replace(pinned, run=lambda: (pinned_runs.append(1), pinned.run()))

    monkeypatch.setattr(CachedDecoder, "pinned", counted)
    batch = hf_tokenizer("bart")(SAMPLE_TEXTS[:4], return_tensors="np", padding=True)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    free = model.generate(ids[1:2], mask[1:2], max_new_tokens=16)
    second_eos = int(free[0, 5])  # a token row 1 emits mid-way: as an EOS id it ends that row there
    for options in (dict(max_new_tokens=16), dict(max_new_tokens=12, min_new_tokens=12),
                    dict(max_new_tokens=16, eos_token_id=[2, second_eos]),
                    dict(max_new_tokens=16, min_new_tokens=8, eos_token_id=[2, second_eos])):
        got = model.generate(ids, mask, **options)
        np.testing.assert_array_equal(got, plain.generate(ids, mask, **options), err_msg=str(options))
        for row in range(2):  # batch 1: pinned from the step after the forced BOS to the one before the forced EOS
            pinned_runs.clear()
            alone = model.generate(ids[row:row + 1], mask[row:row + 1], **options)
            np.testing.assert_array_equal(alone, plain.generate(ids[row:row + 1], mask[row:row + 1], **options))
            assert len(pinned_runs) >= alone.shape[1] - 5, (options, row, len(pinned_runs))
    assert second_eos in free[0, :6] and int(model.generate(ids[1:2], mask[1:2], max_new_tokens=16, min_new_tokens=8,
                                                              eos_token_id=[2, second_eos]).shape[1]) > 7

    def streamed(m):  # row 2 is stopped by the caller after its 3rd token, as a server's stop sequence does
        stop: set[int] = set()
        out = []
        for n, step in enumerate(m.stream_steps(ids, mask, stop_rows=stop, max_new_tokens=10, min_new_tokens=5)):
            out.append(step.ids)
            if n == 2:
                stop.add(2)
        return np.stack(out, axis=1)

    pinned_runs.clear()
    got = streamed(model)
    assert pinned_runs
    np.testing.assert_array_equal(got, streamed(plain))
    pad = model.manifest.pad_token_id
    assert (got[2, 3:] == pad).all() and (got[2, :3] != pad).all()


def test_runs_skip_the_python_wrapper_unless_something_wraps_the_session(exported_dir, hf_tokenizer, monkeypatch):
    """A binding's run is the one pybind call onnxruntime's `run_with_iobinding` makes (its Python wrapper
    first asks whether WebGPU capture is on, each run); a `run_with_iobinding` set on the session object
    itself (bench/breakdown.py times runs so) is honoured. Same tokens either way."""
    import onnxruntime as ort

    model = runtime.load(exported_dir("t5"), provider="cpu")
    batch = hf_tokenizer("t5")(SAMPLE_TEXTS[:2], return_tensors="np", padding=True)
    options = dict(max_new_tokens=8, min_new_tokens=8)
    expected = runtime.load(exported_dir("t5"), provider="cpu", io_binding=False).generate(batch["input_ids"],
                                                                                          batch["attention_mask"],
                                                                                          **options)

    def refuse(*args, **kwargs):
        raise AssertionError("the Python wrapper ran")

    with monkeypatch.context() as patched:
        patched.setattr(ort.InferenceSession, "run_with_iobinding", refuse)
        got = model.generate(batch["input_ids"], batch["attention_mask"], **options)
    np.testing.assert_array_equal(got, expected)
    session = model.graphs.decoder.session
    runs = []
    session.run_with_iobinding = lambda *a, _f=session.run_with_iobinding, **k: (runs.append(1), _f(*a, **k))[1]
    try:
        np.testing.assert_array_equal(model.generate(batch["input_ids"], batch["attention_mask"], **options), expected)
    finally:
        del session.run_with_iobinding
    assert len(runs) == 8


@pytest.mark.parametrize("rows, slots", [([0, 0, 1, 2], [0, 3, 1, 2]),  # a chain: 0 branches, 3 ends
                                         ([1, 0, 2, 2], [1, 0, 2, 3]),  # a swap, and a row that branches
                                         ([0, 1, 3, 3], [0, 1, 3, 2]),
                                         ([3, 3, 3, 3], [3, 2, 1, 0]),
                                         # 0 branches twice: its second row into 1's slot (1 shares 3 positions
                                         # with 0, 2 shares 2), its third into 2's
                                         ([0, 0, 0, 3], [0, 1, 2, 3])])
def test_a_beam_reorder_keeps_continuing_rows_in_place_and_copies_branches_after_the_shared_prefix(
        rows, slots, exported_dir, hf_tokenizer):
    """CachedDecoder.select with shared (beam search's reorder): each parent's first new row takes over its
    slot, untouched; a parent's other new rows go to the slots of the rows that ended (first the one that
    shares the longest prefix with the parent), which take the parent's written positions from where the
    two differ on. Every row then holds its parent's positions, and unwritten positions stay."""
    model = runtime.load(exported_dir("t5"), provider="cpu")
    batch = hf_tokenizer("t5")(SAMPLE_TEXTS[:1], return_tensors="np", padding=True)
    step, start_ids = model._start(batch["input_ids"], batch["attention_mask"], model.options(max_new_tokens=8), 4)
    for _ in range(5):
        step(start_ids)
    block = step._block
    assert block is not None and step._block_holds_all
    tokens = np.array([[0, 1, 2, 3, 4], [0, 1, 2, 9, 9], [0, 1, 7, 7, 7], [0, 5, 5, 5, 5]])  # the beams' histories
    batch_axis, seq_axis = step._block_axes
    axes = (1 + batch_axis, 1 + seq_axis)
    view = np.moveaxis(block, axes, (0, 1))  # [row, position, ...], block's memory
    noise = np.random.default_rng(0).standard_normal(block.shape).astype(block.dtype)
    block[...] = noise
    for row in range(4):  # a written position's values depend on the tokens up to it, as a decoder's do
        for position in range(5):
            view[row, position] = float(tokens[row, : position + 1] @ (7.0 ** np.arange(position + 1)))
    before = view.copy()
    differs = tokens[:, None, :] != tokens[None, :, :]
    # where each two rows first differ (5: alike so far), as beam search hands it over
    shared = np.where(differs.any(axis=2), differs.argmax(axis=2), 5)[None].tolist()
    step.select(np.array(rows), shared)
    assert step._block is block  # in place
    assert step._slots.tolist() == slots
    for parent, slot in zip(rows, slots):
        np.testing.assert_array_equal(view[slot, :5], before[parent, :5])
        np.testing.assert_array_equal(view[slot, 5:], before[slot, 5:])
