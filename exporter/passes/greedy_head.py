"""Greedy search's next token chosen inside the decoder graph, so a greedy step's logits never leave it.

The decoder gets two inputs and one output (names in runtime.manifest):

- `logits_rows` int64 [1]: the leading rows that get `logits` as before; the other rows get the head.
  The runtime feeds the row count (every row: logits, as a graph without the head) or 0 (greedy search's
  steady steps, runtime/search/greedy.py); it never mixes the two in one run.
- `greedy_bias` float32 [vocab]: added to the head rows' logits before the argmax (0, or -inf for the
  ids a logits rule bans on that step, MinLength's EOS).
- `next_ids` int64 [head rows, 1]: argmax(logits + greedy_bias) of each head row, the first on a tie.

The rows are split before the output projection (`hidden`, what the projection reads), so a run computes
one of the two: onnxruntime runs every node whatever a run asks for (bench/README.md), and a projection
over zero rows costs nothing.

Two heads, recorded in the manifest's `greedy_head`:

- "argmax": a copy of the projection (whatever it is: an int8 or int4 MatMul with its quantization
  nodes) over the head rows, then ArgMax. Same logits as the full rows' (dynamic quantization scales
  the rows of one run together, and a run has all its rows on one side), so the same tokens.
- "screened", for a float32 projection `hidden @ W (+ c)` with W and c constant: at batch 1 reading W
  (vocab x hidden x 4 bytes: 66 MB for t5-small, 40% of a step's reads) is the largest part of a step.
  The head reads an int8 copy of W instead (a quarter of the bytes), takes the CANDIDATES best ids by
  those approximate logits, computes the exact float32 logits of those candidates alone (CANDIDATES
  columns of W), and keeps the best. The approximation's error has a bound computed in the graph from
  the row's norm, the activation's quantization step and the columns' rounding error (`_error_bound`):
  when the best exact candidate beats the CANDIDATES-th approximate logit by more than the bound, no
  other id can be the argmax. A row where it does not is recomputed with W whole. So the ids are the
  float32 projection's argmax, up to float32 summation order (candidates within ~1e-6 relative of each
  other), the fuzz every engine has against transformers.

The pass matches the projection by its weights (an initializer with a vocab-sized axis read by a
MatMul-like node) and the nodes between it and `logits`; anything else reading into those nodes makes it
refuse with `GreedyHeadNotApplicable`, and the decoder is left as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporter.passes import save_graph
from runtime.manifest import GREEDY_BIAS, LOGITS, LOGITS_ROWS, NEXT_IDS, Manifest

CANDIDATES = 16  # ids whose exact logits the screened head computes, per row
_PREFIX = "greedy_head/"
_PROJECTIONS = ("MatMul", "MatMulInteger", "MatMulNBits", "DynamicQuantizeMatMul", "Gemm")
_QUANTIZERS = ("DynamicQuantizeLinear",)  # between the hidden states and an int8 projection
_SLACK = 1e-5  # relative to |hidden| * |column|: float32 rounding in the approximate and exact logits


class GreedyHeadNotApplicable(Exception):
    """The decoder's output projection does not have the structure this pass handles (the message says
    why); the graph file is unchanged. Not an S2SError: the export keeps greedy's argmax in the runtime."""


@dataclass(frozen=True)
class _Projection:
    hidden: str  # [rows, 1, hidden] float32: what the output projection reads
    nodes: list[onnx.NodeProto]  # from `hidden` to `logits`, in graph order
    weight: np.ndarray | None  # [hidden, vocab] float32 when the projection is a float32 MatMul (screened)
    bias: np.ndarray | None  # [vocab] float32 added after it, if any
    columns: tuple[str, int]  # where the screened head gathers a vocab id's weights: (tensor, its vocab axis)


def add_greedy_head(export_dir: Path, manifest: Manifest) -> Manifest:
    """Rewrite `export_dir / manifest.decoder_file` in place (see the module docstring).

    Returns the manifest with `greedy_head` set to the head's kind.

    Raises:
        GreedyHeadNotApplicable: the decoder does not match; nothing was changed.
    """
    if manifest.vocab_size is None or manifest.first_step_file or manifest.use_cache_branch:
        raise GreedyHeadNotApplicable("the decoder is not a single cached-step graph with logits")
    path = export_dir / manifest.decoder_file
    model = onnx.load(path)
    projection = _match(model.graph, manifest.vocab_size)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 18)
    kind = _rewrite(model.graph, projection, manifest.vocab_size, opset)
    save_graph(model, path)
    return replace(manifest, greedy_head=kind)


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """Initializers, Constant nodes' values, and 2-D initializers read through a Transpose (a tied
    output projection: onnxruntime folds the Transpose at load)."""
    found = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            found[node.output[0]] = node.attribute[0].t
        elif node.op_type == "Transpose" and node.input[0] in found and len(found[node.input[0]].dims) == 2:
            perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
            if perm in ([], [[1, 0]]):
                found[node.output[0]] = numpy_helper.from_array(
                    np.ascontiguousarray(numpy_helper.to_array(found[node.input[0]]).T), node.output[0])
    return found


def _match(graph: onnx.GraphProto, vocab: int) -> _Projection:
    producers = {output: node for node in graph.node for output in node.output}
    constants = _constants(graph)
    if LOGITS not in producers:
        raise GreedyHeadNotApplicable("no node writes logits")
    ancestors: list[onnx.NodeProto] = []  # nodes logits depends on, nearest first, up to the projection
    frontier, projection = [producers[LOGITS]], None
    while frontier and projection is None:
        node = frontier.pop(0)
        ancestors.append(node)
        weights = [constants[name] for name in node.input if name in constants]
        if node.op_type in _PROJECTIONS and any(vocab in w.dims for w in weights):
            projection = node
            break
        frontier += [producers[name] for name in node.input if name in producers and name not in constants]
        if len(ancestors) > 12:
            break
    if projection is None:
        raise GreedyHeadNotApplicable("no MatMul with vocab-sized weights near logits")
    activation = projection.input[0]
    quantizer = producers.get(activation)
    hidden = quantizer.input[0] if quantizer is not None and quantizer.op_type in _QUANTIZERS else activation
    nodes = _between(graph, hidden, producers)
    inside = {output for node in nodes for output in node.output}
    for node in nodes:
        stray = [name for name in node.input if name and name != hidden and name not in inside
                 and name not in constants]
        if stray:
            raise GreedyHeadNotApplicable(f"{node.name or node.op_type} reads {stray[0]!r} besides the hidden states")
    weight, bias = _float_projection(nodes, hidden, constants, vocab)
    transpose = producers.get(projection.input[1])
    columns = (transpose.input[0], 0) if transpose is not None and transpose.op_type == "Transpose" \
        else (projection.input[1], 1)
    return _Projection(hidden, nodes, weight, bias, columns)


def _between(graph: onnx.GraphProto, hidden: str, producers: dict[str, onnx.NodeProto]) -> list[onnx.NodeProto]:
    """The nodes on a path from `hidden` to logits, in graph order."""
    needed: set[int] = set()
    stack = [producers[LOGITS]]
    while stack:
        node = stack.pop()
        if id(node) in needed:
            continue
        needed.add(id(node))
        stack += [producers[name] for name in node.input if name in producers and name != hidden]
    reaches = {hidden}
    nodes = []
    for node in graph.node:
        if id(node) in needed and any(name in reaches for name in node.input):
            reaches.update(node.output)
            nodes.append(node)
    if LOGITS not in reaches:
        raise GreedyHeadNotApplicable("logits do not follow from the projection's input")
    return nodes


def _float_projection(nodes: list[onnx.NodeProto], hidden: str, constants: dict[str, onnx.TensorProto],
                      vocab: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(W [hidden, vocab], c [vocab] or None) when the nodes are `MatMul(hidden, W)` and optionally
    `Add(., c)` (Identity nodes aside), all float32 constants; else (None, None)."""
    alias = {node.output[0]: node.input[0] for node in nodes if node.op_type == "Identity"}
    nodes = [node for node in nodes if node.op_type != "Identity"]
    first = nodes[0]
    if first.op_type != "MatMul" or first.input[0] != hidden or first.input[1] not in constants:
        return None, None
    weight = numpy_helper.to_array(constants[first.input[1]])
    if weight.dtype != np.float32 or weight.ndim != 2 or weight.shape[1] != vocab:
        return None, None
    if len(nodes) == 1:
        return weight, None
    add = nodes[1]
    other = [name for name in add.input if alias.get(name, name) != first.output[0]]
    if len(nodes) != 2 or add.op_type != "Add" or len(other) != 1 or other[0] not in constants:
        return None, None
    bias = numpy_helper.to_array(constants[other[0]])
    if bias.dtype != np.float32 or bias.size != vocab:
        return None, None
    return weight, bias.reshape(vocab)


class _Nodes:
    """New nodes and initializers, named under _PREFIX."""

    def __init__(self, opset: int) -> None:
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._constants: dict[str, np.ndarray] = {}

    def const(self, name: str, value: np.ndarray) -> str:
        """An initializer named `name`, made on first use (later uses must give the same value)."""
        full = _PREFIX + "const/" + name
        made = self._constants.get(full)
        if made is None:
            made = self._constants[full] = value
            self.initializers.append(numpy_helper.from_array(value, full))
        assert np.array_equal(made, value), name
        return full

    def op(self, op_type: str, inputs: list[str], name: str, outputs: int = 1, domain: str = "",
           **attrs) -> list[str]:
        names = [_PREFIX + name + (f".{i}" if outputs > 1 else "") for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=_PREFIX + name, domain=domain, **attrs))
        return names

    def one(self, op_type: str, inputs: list[str], name: str, domain: str = "", **attrs) -> str:
        return self.op(op_type, inputs, name, 1, domain, **attrs)[0]

    def reduce(self, op_type: str, value: str, name: str, axes: list[int] | None = None, keepdims: int = 1) -> str:
        """A Reduce* node: its axes an input from opset 18 on, an attribute before."""
        if axes is None:
            return self.one(op_type, [value], name, keepdims=keepdims)
        if self.opset >= 18:
            return self.one(op_type, [value, self.const(name + ".axes", np.array(axes, np.int64))], name,
                            keepdims=keepdims)
        return self.one(op_type, [value], name, axes=axes, keepdims=keepdims)


def _rewrite(graph: onnx.GraphProto, projection: _Projection, vocab: int, opset: int) -> str:
    new = _Nodes(opset)
    zero, end = new.const("zero", np.zeros(1, np.int64)), new.const("end", np.array([2**62], np.int64))
    axis0 = new.const("axis0", np.zeros(1, np.int64))
    full = new.one("Slice", [projection.hidden, zero, LOGITS_ROWS, axis0], "full_rows")
    head = new.one("Slice", [projection.hidden, LOGITS_ROWS, end, axis0], "head_rows")
    for node in projection.nodes:  # the projection as it was, over the full rows
        node.input[:] = [full if name == projection.hidden else name for name in node.input]
    if projection.weight is not None:
        kind = "screened"
        ids = _screened(new, head, projection)
    else:
        kind = "argmax"
        logits = _copied(new, projection.nodes, full, head)
        scores = new.one("Add", [logits, GREEDY_BIAS], "scores")
        ids = new.one("ArgMax", [scores], "argmax", axis=2, keepdims=0)
    new.nodes.append(helper.make_node("Identity", [ids], [NEXT_IDS], name=_PREFIX + "next_ids"))
    at = max(list(graph.node).index(node) for node in projection.nodes) + 1
    nodes = list(graph.node)
    nodes[at:at] = new.nodes
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new.initializers)
    graph.input.extend([helper.make_tensor_value_info(LOGITS_ROWS, TensorProto.INT64, [1]),
                        helper.make_tensor_value_info(GREEDY_BIAS, TensorProto.FLOAT, [vocab])])
    graph.output.append(helper.make_tensor_value_info(NEXT_IDS, TensorProto.INT64, ["head_rows", 1]))
    return kind


def _copied(new: _Nodes, nodes: list[onnx.NodeProto], full: str, head: str) -> str:
    """The projection's nodes again, reading the head rows; returns the copy's logits."""
    renamed = {full: head}
    for node in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = _PREFIX + (node.name or node.output[0])
        copy.input[:] = [renamed.get(name, name) for name in node.input]
        for i, name in enumerate(node.output):
            renamed[name] = copy.output[i] = _PREFIX + name
        new.nodes.append(copy)
    return renamed[LOGITS]


def _screened(new: _Nodes, head: str, projection: _Projection) -> str:
    """The screened head's nodes (module docstring); returns next ids [rows, 1] int64."""
    weight, bias, weight_name = projection.weight, projection.bias, projection.nodes[0].input[1]
    assert weight is not None
    dim, vocab = weight.shape
    wide = weight.astype(np.float64)
    scale = np.abs(wide).max(axis=0) / 127.0  # per column (vocab id)
    scale[scale == 0] = 1.0
    quantized = np.clip(np.rint(wide / scale), -127, 127)
    rounded = quantized * scale
    column_error = float(np.linalg.norm(wide - rounded, axis=0).max())  # max over ids of |w - w~|
    column_norm = float(np.linalg.norm(rounded, axis=0).max())  # max over ids of |w~|
    bans = GREEDY_BIAS
    if bias is not None:
        bans = new.one("Add", [GREEDY_BIAS, new.const("logits_bias", bias.astype(np.float32))], "bias")
    approx = new.one("DynamicQuantizeMatMul", [head, new.const("weight.int8", quantized.astype(np.int8)),
                                               new.const("weight.scale", scale.astype(np.float32))],
                     "approximate", domain="com.microsoft")
    k = min(CANDIDATES, vocab)
    # Axes count from the front (2: the vocabulary): onnxruntime 1.31's ArgMax with axis=-1 returns its
    # input's shape for an input with no rows, which every run but a greedy head step gives this head.
    axis2 = new.const("axis2", np.array([2], np.int64))
    values, ids = new.op("TopK", [new.one("Add", [approx, bans], "approximate_scores"),
                                  new.const("k", np.array([k], np.int64))], "candidates", outputs=2, axis=2)
    source, axis = projection.columns
    columns = new.one("Gather", [source, ids], "columns", axis=axis)
    if axis == 1:  # [hidden, rows, 1, k]
        columns = new.one("Transpose", [columns], "columns_by_row", perm=[1, 2, 3, 0])
    last_axis = new.const("axis3", np.array([3], np.int64))
    row = new.one("Unsqueeze", [head, last_axis], "row")  # [rows, 1, hidden, 1]
    exact = new.one("Squeeze", [new.one("MatMul", [columns, row], "exact_product"), last_axis],
                    "exact")  # [rows, 1, k, hidden] @ [rows, 1, hidden, 1] -> [rows, 1, k]
    exact = new.one("Add", [exact, new.one("Gather", [bans, ids], "candidate_bias", axis=0)], "exact_scores")
    best = new.reduce("ReduceMax", exact, "best", [2])  # [rows, 1, 1]
    chosen = new.one("GatherElements", [ids, new.one("ArgMax", [exact], "best_at", axis=2, keepdims=1)],
                     "chosen", axis=2)
    chosen = new.one("Squeeze", [chosen, axis2], "chosen_ids")
    last = new.one("Slice", [values, new.const("k-1", np.array([k - 1], np.int64)),
                             new.const("k", np.array([k], np.int64)), axis2], "last_candidate")
    bound = new.one("Add", [last, _error_bound(new, head, dim, column_error, column_norm)], "bound")
    certain = new.one("Greater", [best, bound], "certain")  # [rows, 1, 1]
    return _recomputed(new, head, chosen, certain, weight_name, bans)


def _error_bound(new: _Nodes, head: str, dim: int, column_error: float, column_norm: float) -> str:
    """[rows, 1, 1]: |approximate - exact logit| for any id is at most |h| |w - w~| + |h - h~| |w~|
    (Cauchy-Schwarz), h~ the uint8-quantized rows (one scale for the run's rows: their range over 255;
    at most one step off per element, counting the zero point's rounding), plus float32 slack."""
    norm = new.reduce("ReduceL2", head, "row_norm", [2])
    flat = new.one("Reshape", [head, new.const("flat", np.array([-1], np.int64))], "flat")
    flat = new.one("Concat", [flat, new.const("zero_f", np.zeros(1, np.float32))], "flat_with_zero", axis=0)
    spread = new.one("Sub", [new.reduce("ReduceMax", flat, "high", keepdims=0),
                             new.reduce("ReduceMin", flat, "low", keepdims=0)], "range")
    step_norm = new.one("Mul", [spread, new.const("steps", np.array(np.sqrt(dim) / 255.0 * column_norm, np.float32))],
                        "activation_error")
    rows = new.one("Mul", [norm, new.const("columns", np.array(column_error + _SLACK * column_norm, np.float32))],
                   "weight_error")
    return new.one("Add", [rows, step_norm], "error")


def _recomputed(new: _Nodes, head: str, chosen: str, certain: str, weight_name: str, bans: str) -> str:
    """chosen [rows, 1] with each row that is not `certain` replaced by its argmax over W whole."""
    doubtful = new.one("Not", [new.one("Reshape", [certain, new.const("flat", np.array([-1], np.int64))],
                                       "certain_rows")], "doubtful")
    where = new.one("Transpose", [new.one("NonZero", [doubtful], "doubtful_at")], "doubtful_index", perm=[1, 0])
    rows = new.one("GatherND", [head, where], "doubtful_rows")  # [n, 1, hidden]
    logits = new.one("Add", [new.one("MatMul", [rows, weight_name], "doubtful_logits"), bans], "doubtful_scores")
    ids = new.one("ArgMax", [logits], "doubtful_ids", axis=2, keepdims=0)  # [n, 1]
    return new.one("ScatterND", [chosen, where, ids], "ids")
