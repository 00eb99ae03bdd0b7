"""exporter/passes/greedy_head.py and the runtime's greedy steps through it.

The oracle for ids is numpy's argmax of the float32 projection computed in float64 (on a graph holding
the projection alone), and, on exported models, the same export without the head (greedy's argmax in
the runtime) and transformers (tests/test_generate_parity.py runs every architecture through the
default export, which has this pass).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import runtime
from exporter.passes import greedy_head
from exporter.passes.greedy_head import CANDIDATES, GreedyHeadNotApplicable
from runtime.decoder import CachedDecoder
from runtime.manifest import GREEDY_BIAS, LOGITS, LOGITS_ROWS, NEXT_IDS, Manifest
from tests.fixtures.hf_models import SAMPLE_TEXTS, VARIANTS

DIM, VOCAB = 64, 1000


def _projection(weight: np.ndarray, bias: np.ndarray | None = None, *, tied: bool = False,
                scale: float | None = None) -> onnx.ModelProto:
    """hidden [rows, 1, DIM] -> MatMul (weight, or Transpose of a [VOCAB, DIM] table: tied) -> (+ bias)
    (* a constant: not a plain projection) -> logits."""
    inits, nodes = [], []
    if tied:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), "table"))
        nodes.append(helper.make_node("Transpose", ["table"], ["weight"], perm=[1, 0]))
    else:
        inits.append(numpy_helper.from_array(weight, "weight"))
    last = "projected"
    nodes.append(helper.make_node("MatMul", ["hidden", "weight"], [last]))
    if bias is not None:
        inits.append(numpy_helper.from_array(bias, "bias"))
        nodes.append(helper.make_node("Add", [last, "bias"], ["biased"]))
        last = "biased"
    if scale is not None:
        inits.append(numpy_helper.from_array(np.array(scale, np.float32), "scale"))
        nodes.append(helper.make_node("Mul", [last, "scale"], ["scaled"]))
        last = "scaled"
    nodes.append(helper.make_node("Identity", [last], [LOGITS]))
    hidden = helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["rows", 1, DIM])
    logits = helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, ["rows", 1, VOCAB])
    graph = helper.make_graph(nodes, "projection", [hidden], [logits], inits)
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8)


def _with_head(model: onnx.ModelProto, *internal: str) -> tuple[ort.InferenceSession, str]:
    """A session of `model` with the greedy head, `internal` head tensors as extra outputs; and its kind."""
    head = onnx.ModelProto()
    head.CopyFrom(model)
    kind = greedy_head._rewrite(head.graph, greedy_head._match(head.graph, VOCAB), VOCAB, 18)
    for name in internal:
        kind_of = TensorProto.BOOL if name == "certain" else TensorProto.FLOAT
        head.graph.output.append(helper.make_tensor_value_info(f"greedy_head/{name}", kind_of, None))
    return ort.InferenceSession(head.SerializeToString(), providers=["CPUExecutionProvider"]), kind


def _run(session: ort.InferenceSession, hidden: np.ndarray, logits_rows: int, bias: np.ndarray | None = None,
         *outputs: str) -> list[np.ndarray]:
    feeds = {"hidden": hidden, LOGITS_ROWS: np.array([logits_rows], np.int64),
             GREEDY_BIAS: bias if bias is not None else np.zeros(VOCAB, np.float32)}
    return session.run([LOGITS, NEXT_IDS, *outputs], feeds)


def _exact_ids(hidden: np.ndarray, weight: np.ndarray, bias: np.ndarray | None = None,
               bans: np.ndarray | None = None) -> np.ndarray:
    logits = hidden[:, 0].astype(np.float64) @ weight.astype(np.float64)
    logits += 0 if bias is None else bias
    logits += 0 if bans is None else bans
    return logits.argmax(axis=1)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_screened_ids_are_the_float32_argmax(tied, with_bias):
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((DIM, VOCAB)).astype(np.float32)
    bias = rng.standard_normal(VOCAB).astype(np.float32) if with_bias else None
    session, kind = _with_head(_projection(weight, bias, tied=tied), "certain")
    assert kind == "screened"
    hidden = rng.standard_normal((40, 1, DIM)).astype(np.float32)
    logits, ids, certain = _run(session, hidden, 0, None, "greedy_head/certain")
    assert logits.shape == (0, 1, VOCAB)
    np.testing.assert_array_equal(ids[:, 0], _exact_ids(hidden, weight, bias))
    assert certain.mean() > 0.5  # most rows decided by the screen, not recomputed whole


def test_every_row_gets_the_logits_as_before():
    rng = np.random.default_rng(2)
    weight = rng.standard_normal((DIM, VOCAB)).astype(np.float32)
    session, _ = _with_head(_projection(weight))
    plain = ort.InferenceSession(_projection(weight).SerializeToString(), providers=["CPUExecutionProvider"])
    hidden = rng.standard_normal((5, 1, DIM)).astype(np.float32)
    logits, ids = _run(session, hidden, 5)
    np.testing.assert_array_equal(logits, plain.run([LOGITS], {"hidden": hidden})[0])
    assert ids.shape == (0, 1)


def test_banned_ids_are_never_chosen():
    rng = np.random.default_rng(3)
    weight = rng.standard_normal((DIM, VOCAB)).astype(np.float32)
    session, _ = _with_head(_projection(weight))
    hidden = rng.standard_normal((8, 1, DIM)).astype(np.float32)
    bans = np.zeros(VOCAB, np.float32)
    bans[np.unique(_exact_ids(hidden, weight))] = -np.inf  # every row's best id
    _, ids = _run(session, hidden, 0, bans)
    np.testing.assert_array_equal(ids[:, 0], _exact_ids(hidden, weight, None, bans))
    assert np.isfinite(bans[ids[:, 0]]).all()


def test_near_ties_beyond_the_candidates_are_recomputed_exactly():
    """More than CANDIDATES ids within the screen's error of the best: the int8 screen cannot order
    them, and rows of that kind are recomputed whole; a clear row in the same run keeps the screen."""
    rng = np.random.default_rng(4)
    weight = rng.standard_normal((DIM, VOCAB)).astype(np.float32)
    base = rng.standard_normal(DIM).astype(np.float32)
    near = 4 * CANDIDATES
    weight[:, :near] = base[:, None] * 3 + rng.standard_normal((DIM, near)).astype(np.float32) * 1e-3
    hidden = rng.standard_normal((6, 1, DIM)).astype(np.float32)
    hidden[:3, 0] = base + rng.standard_normal((3, DIM)).astype(np.float32) * 0.1  # dozens of near-equal ids on top
    session, _ = _with_head(_projection(weight), "certain")
    _, ids, certain = _run(session, hidden, 0, None, "greedy_head/certain")
    expected = _exact_ids(hidden, weight)
    np.testing.assert_array_equal(ids[:, 0], expected)
    assert not certain[:3].any() and certain[3:].any()


def test_candidates_are_ranked_by_their_exact_logits():
    """Heavy-tailed weights (coarse int8 steps): rows where the screen's own best is not the float32
    argmax, yet the screen's candidates decide (no recomputation), get the float32 argmax."""
    rng = np.random.default_rng(6)
    weight = rng.standard_t(2, (DIM, VOCAB)).astype(np.float32)
    hidden = rng.standard_normal((300, 1, DIM)).astype(np.float32)
    session, _ = _with_head(_projection(weight), "certain", "approximate_scores")
    _, ids, certain, approximate = _run(session, hidden, 0, None, "greedy_head/certain",
                                        "greedy_head/approximate_scores")
    expected = _exact_ids(hidden, weight)
    np.testing.assert_array_equal(ids[:, 0], expected)
    screen_wrong = approximate[:, 0].argmax(axis=1) != expected
    assert (screen_wrong & certain[:, 0, 0]).any()


def test_another_projection_gets_an_argmax_of_its_own_logits():
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((DIM, VOCAB)).astype(np.float32)
    model = _projection(weight, scale=0.5)  # a Mul after the MatMul: not the screened shape
    session, kind = _with_head(model)
    assert kind == "argmax"
    hidden = rng.standard_normal((7, 1, DIM)).astype(np.float32)
    bans = np.zeros(VOCAB, np.float32)
    bans[::3] = -np.inf
    full, _ = _run(session, hidden, 7)
    _, ids = _run(session, hidden, 0, bans)
    np.testing.assert_array_equal(ids[:, 0], (full[:, 0] + bans).argmax(axis=1))


def test_a_projection_that_reads_another_tensor_is_refused():
    model = _projection(np.ones((DIM, VOCAB), np.float32))
    graph = model.graph
    graph.input.append(helper.make_tensor_value_info("other", TensorProto.FLOAT, [1]))
    mul = helper.make_node("Mul", ["projected", "other"], ["scaled"])
    graph.node[-1].input[0] = "scaled"
    graph.node.insert(len(graph.node) - 1, mul)
    with pytest.raises(GreedyHeadNotApplicable, match="other"):
        greedy_head._match(graph, VOCAB)
    with pytest.raises(GreedyHeadNotApplicable, match="vocab"):
        greedy_head._match(_projection(np.ones((DIM, VOCAB), np.float32)).graph, VOCAB + 1)


# --- exported models -------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_exports_carry_the_head(variant, exported_dir):
    manifest = Manifest.read(exported_dir(variant))
    assert manifest.greedy_head == "screened"
    assert f"greedy-head-{manifest.greedy_head}" in manifest.passes
    quantized = Manifest.read(exported_dir(variant, quantize="int8"))
    assert quantized.greedy_head == "argmax"
    plain = Manifest.read(exported_dir(variant, greedy_head=False))
    assert plain.greedy_head is None
    inputs = [i.name for i in onnx.load(exported_dir(variant, greedy_head=False) / plain.decoder_file).graph.input]
    assert LOGITS_ROWS not in inputs


GREEDY_OPTIONS = [dict(max_new_tokens=14), dict(max_new_tokens=14, min_new_tokens=14),
                  dict(max_new_tokens=14, min_new_tokens=6)]


@pytest.mark.parametrize("variant", ["t5", "bart", "marian", "pegasus"])
@pytest.mark.parametrize("quantize", [None, "int8"])
def test_greedy_tokens_equal_the_runtime_argmax(variant, quantize, exported_dir, hf_tokenizer, monkeypatch):
    """The same export without the head is the oracle; padded batches, min length (the bias bans EOS, then
    lets it through), rows that finish early (the head serves the rows left); and the head steps really run."""
    kwargs = {"quantize": quantize} if quantize else {}
    headed = runtime.load(exported_dir(variant, **kwargs), provider="cpu")
    plain = runtime.load(exported_dir(variant, greedy_head=False, **kwargs), provider="cpu")
    batch = hf_tokenizer(variant)(SAMPLE_TEXTS[:4], return_tensors="np", padding=True)
    made = []
    original = CachedDecoder._head_step

    def counting(self, steady):
        head = original(self, steady)
        made.append(head)
        return head

    monkeypatch.setattr(CachedDecoder, "_head_step", counting)
    for options in GREEDY_OPTIONS:
        expected = plain.generate(batch["input_ids"], batch["attention_mask"], **options)
        made.clear()
        got = headed.generate(batch["input_ids"], batch["attention_mask"], **options)
        np.testing.assert_array_equal(got, expected, err_msg=str(options))
        assert any(head is not None for head in made), options
    one = headed.generate(batch["input_ids"][:1], batch["attention_mask"][:1], max_new_tokens=10, min_new_tokens=10)
    assert one.shape[1] == 11  # EOS banned by the bias for all ten steps
