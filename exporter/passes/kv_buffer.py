"""Self-attention K/V in preallocated buffers, written in place: one GroupQueryAttention node per layer.

optimum's cached decoder grows each layer's self-attention cache with `Concat(past, new)`: every step
copies the whole past into a new `present`, so a step's cost grows with the length generated (measured
on the t5-small shape, batch 1, one thread: Concat was 15% of a step at past 512 in fp32, 23% in int8).
This pass replaces, per layer, the cached attention

    present_k = Concat(past_k, k)                 present_v = Concat(past_v, v)
    probs = Softmax(scale * q @ present_k^T + bias)
    out = probs @ present_v                        (with the reshapes/transposes around it)

by onnxruntime's `com.microsoft.GroupQueryAttention` (num_heads = kv_num_heads: plain multi-head
attention) over a buffer `[rows, heads, capacity, head_dim]` that is both the past input and the present
output: the node writes the new position at `seqlens_k` in place and attends over `total_sequence_length`
positions, so no step copies the cache. The runtime binds one buffer per state as input and output
(the manifest's `kind="buffer"`; runtime/decoder.py) and feeds the two lengths.

Everything that read the cache's shape (T5's relative position bias, BART's positions, the causal
mask) reads a shape computed from `seqlens_k` instead, since the buffer's own length is its capacity.
`bias` is whatever the graph added between the scores and the softmax (T5's position bias and mask,
BART's causal mask); `scale` the product of the constant factors on q, on k and on the scores.

The pass matches that structure and nothing else: a layer whose attention does not have it (another
op between the scores and the softmax, a cache read elsewhere) makes it refuse with
`KVBufferNotApplicable`, naming the node, and the decoder is left as it was. Nothing here knows an
architecture. For CPU exports: onnxruntime's CUDA GroupQueryAttention takes float16 only, so an fp16
export keeps the Concat graph.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from exporter.passes import save_graph
from runtime.manifest import SEQLENS_K, TOTAL_SEQUENCE_LENGTH, Manifest, StateTensor

_PREFIX = "kv_buffer/"


class KVBufferNotApplicable(Exception):
    """The decoder's self-attention does not have the structure this pass rewrites (the message says
    where); the graph file is unchanged. Not an S2SError: the export keeps the Concat cache."""


@dataclass(frozen=True)
class _Layer:
    """One layer's cached self-attention, as matched in the graph."""

    key: StateTensor
    value: StateTensor
    query: str  # [batch, 1, heads * head_dim], before the heads are split
    new_key: str  # the same, of this step's key
    new_value: str
    output: str  # [batch, 1, heads * head_dim]: the attention output, heads merged
    context: str  # [batch, heads, 1, head_dim]: probs @ v, before the heads are merged (its Shape may be read)
    bias: list[str]  # tensors added to the scores before the softmax, in order
    scale: float
    heads: int
    head_dim: int


def use_kv_buffers(export_dir: Path, manifest: Manifest) -> Manifest:
    """Rewrite `export_dir / manifest.decoder_file` in place (see the module docstring).

    Returns the manifest with the self-attention states as `kind="buffer"`.

    Raises:
        KVBufferNotApplicable: the decoder does not match; nothing was changed.
    """
    if manifest.first_step_file or manifest.use_cache_branch:
        raise KVBufferNotApplicable("the decoder is not a single cached-step graph")
    grows = [state for state in manifest.states if state.kind == "grows"]
    if not grows:
        raise KVBufferNotApplicable("the decoder has no growing self-attention cache")
    path = export_dir / manifest.decoder_file
    model = onnx.load(path)
    graph = _Graph(model.graph)
    if SEQLENS_K in graph.inputs or TOTAL_SEQUENCE_LENGTH in graph.inputs:
        raise KVBufferNotApplicable(f"the decoder already has an input {SEQLENS_K!r} or {TOTAL_SEQUENCE_LENGTH!r}")
    layers = _match_layers(graph, grows)
    _rewrite(model, graph, layers)
    _smoke_run(model)
    save_graph(model, path)
    buffered = {state.input_name for layer in layers for state in (layer.key, layer.value)}
    states = tuple(replace(state, kind="buffer") if state.input_name in buffered else state
                   for state in manifest.states)
    return replace(manifest, states=states)


class _Graph:
    """Indexes of one graph: who produces and who reads each tensor, and constant values."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.producer = {name: node for node in graph.node for name in node.output}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.readers.setdefault(name, []).append(node)
        self.inputs = {value.name: value for value in graph.input}
        self.outputs = {value.name for value in graph.output}
        self.initializers = {init.name: init for init in graph.initializer}

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        return None

    def only_reader(self, name: str, where: str) -> onnx.NodeProto:
        readers = self.readers.get(name, [])
        if len(readers) != 1 or name in self.outputs:
            raise KVBufferNotApplicable(f"{where}: {name!r} is read by {len(readers)} nodes, expected one")
        return readers[0]

    def made_by(self, name: str, op_type: str, where: str) -> onnx.NodeProto:
        node = self.producer.get(name)
        if node is None or node.op_type != op_type:
            found = node.op_type if node is not None else "a graph input"
            raise KVBufferNotApplicable(f"{where}: {name!r} comes from {found}, expected {op_type}")
        return node


def _attr(node: onnx.NodeProto, name: str, default=None):
    for attr in node.attribute:
        if attr.name == name:
            return helper.get_attribute_value(attr)
    return default


def _match_layers(graph: _Graph, grows: list[StateTensor]) -> list[_Layer]:
    by_output = {state.output_name: state for state in grows}
    layers: list[_Layer] = []
    paired: set[str] = set()
    for key in grows:
        if key.input_name in paired:
            continue
        layer = _match_key(graph, key, by_output)
        if layer is None:
            continue  # a value state: matched from its key
        paired.update((layer.key.input_name, layer.value.input_name))
        layers.append(layer)
    unmatched = [state.input_name for state in grows if state.input_name not in paired]
    if unmatched:
        raise KVBufferNotApplicable(f"no attention found reading the cache {unmatched[0]!r}")
    return layers


def _match_key(graph: _Graph, key: StateTensor, by_output: dict[str | None, StateTensor]) -> _Layer | None:
    """The layer whose scores read `key`'s present, or None when `key` is read as a value."""
    where = f"cache {key.input_name!r}"
    concat = graph.made_by(key.output_name or "", "Concat", where)
    if list(concat.input[:1]) != [key.input_name] or len(concat.input) != 2 or _attr(concat, "axis") not in (2, -2):
        raise KVBufferNotApplicable(f"{where}: {concat.name!r} is not Concat(past, new) on the sequence axis")
    readers = [n for n in graph.readers.get(key.output_name or "", []) if n.op_type != "Shape"]
    if len(readers) != 1:
        raise KVBufferNotApplicable(f"{where}: its present is read by {len(readers)} attention nodes")
    if readers[0].op_type == "MatMul" and readers[0].input[1] == key.output_name:
        return None  # probs @ present_v: this is a value cache
    transpose = readers[0]
    if transpose.op_type != "Transpose" or list(_attr(transpose, "perm", [])) != [0, 1, 3, 2]:
        raise KVBufferNotApplicable(f"{where}: {transpose.name!r} ({transpose.op_type}) reads the present")
    scale = 1.0
    scores_input = transpose.output[0]
    node = graph.only_reader(scores_input, where)
    if node.op_type == "Mul":  # SDPA's export scales k^T (and q) by sqrt(scale) each
        scale *= _scalar(graph, node, scores_input, where)
        scores_input = node.output[0]
        node = graph.only_reader(scores_input, where)
    if node.op_type != "MatMul" or node.input[1] != scores_input:
        raise KVBufferNotApplicable(f"{where}: the scores come from {node.op_type} {node.name!r}, not q @ k^T")
    scores_matmul = node
    query, q_scale = _query_side(graph, scores_matmul.input[0], where)
    scale *= q_scale
    # scores -> (scale) -> + bias ... -> (Cast) -> Softmax
    tensor = scores_matmul.output[0]
    bias: list[str] = []
    while True:
        node = graph.only_reader(tensor, where)
        if node.op_type in ("Mul", "Div") and not bias:
            factor = _scalar(graph, node, tensor, where)
            scale *= factor if node.op_type == "Mul" else 1.0 / factor
        elif node.op_type == "Add":
            bias.append(node.input[1] if node.input[0] == tensor else node.input[0])
        elif node.op_type == "Cast" and _attr(node, "to") == TensorProto.FLOAT:
            pass
        elif node.op_type == "Softmax" and _attr(node, "axis", -1) in (-1, 3):
            break
        else:
            raise KVBufferNotApplicable(f"{where}: {node.op_type} {node.name!r} between the scores and the softmax")
        tensor = node.output[0]
    probs = node.output[0]
    node = graph.only_reader(probs, where)
    if node.op_type == "Cast" and _attr(node, "to") == TensorProto.FLOAT:
        probs = node.output[0]
        node = graph.only_reader(probs, where)
    value = by_output.get(node.input[1]) if node.op_type == "MatMul" and node.input[0] == probs else None
    if value is None:
        raise KVBufferNotApplicable(f"{where}: the probabilities are not multiplied by a value cache")
    value_concat = graph.made_by(value.output_name or "", "Concat", f"cache {value.input_name!r}")
    if list(value_concat.input[:1]) != [value.input_name] or _attr(value_concat, "axis") not in (2, -2):
        raise KVBufferNotApplicable(f"cache {value.input_name!r}: not Concat(past, new) on the sequence axis")
    output = _merged_heads(graph, node.output[0], where)
    heads, head_dim = _heads(graph, key, where)
    return _Layer(key=key, value=value, query=query, new_key=_split_heads_source(graph, concat.input[1], where),
                  new_value=_split_heads_source(graph, value_concat.input[1], where), output=output,
                  context=node.output[0], bias=bias, scale=scale, heads=heads, head_dim=head_dim)


def _scalar(graph: _Graph, node: onnx.NodeProto, operand: str, where: str) -> float:
    other = node.input[1] if node.input[0] == operand else node.input[0]
    value = graph.constant(other)
    if value is None or value.size != 1:
        raise KVBufferNotApplicable(f"{where}: {node.op_type} {node.name!r} is not by a constant scalar")
    return float(value.reshape(()))


def _query_side(graph: _Graph, tensor: str, where: str) -> tuple[str, float]:
    """q [batch, heads, 1, head_dim] -> (the tensor before its heads were split, its constant scale)."""
    scale = 1.0
    node = graph.producer.get(tensor)
    if node is not None and node.op_type == "Mul":
        operand = node.input[0] if graph.constant(node.input[0]) is None else node.input[1]
        scale = _scalar(graph, node, operand, where)
        tensor = operand
    return _split_heads_source(graph, tensor, where), scale


def _split_heads_source(graph: _Graph, tensor: str, where: str) -> str:
    """`Transpose(Reshape(x, [b, s, heads, head_dim]), [0, 2, 1, 3])` -> x."""
    transpose = graph.made_by(tensor, "Transpose", where)
    if list(_attr(transpose, "perm", [])) != [0, 2, 1, 3]:
        raise KVBufferNotApplicable(f"{where}: {transpose.name!r} does not split heads")
    reshape = graph.made_by(transpose.input[0], "Reshape", where)
    return reshape.input[0]


def _merged_heads(graph: _Graph, tensor: str, where: str) -> str:
    """attention @ v [batch, heads, 1, head_dim] -> the `Reshape(Transpose(., [0, 2, 1, 3]))` that merges heads.

    Shape nodes may read the context too (hand-written models compute the merged shape from it): the
    rewrite gives them a shape computed from the query instead."""
    readers = [node for node in graph.readers.get(tensor, []) if node.op_type != "Shape"]
    transpose = readers[0] if len(readers) == 1 else graph.only_reader(tensor, where)
    if transpose.op_type != "Transpose" or list(_attr(transpose, "perm", [])) != [0, 2, 1, 3]:
        raise KVBufferNotApplicable(f"{where}: the attention output goes to {transpose.op_type} {transpose.name!r}")
    reshape = graph.only_reader(transpose.output[0], where)
    if reshape.op_type != "Reshape":
        raise KVBufferNotApplicable(f"{where}: the attention output goes to {reshape.op_type} {reshape.name!r}")
    return reshape.output[0]


def _heads(graph: _Graph, state: StateTensor, where: str) -> tuple[int, int]:
    dims = graph.inputs[state.input_name].type.tensor_type.shape.dim
    if len(dims) != 4 or not dims[1].HasField("dim_value") or not dims[3].HasField("dim_value") \
            or (state.batch_axis, state.seq_axis) != (0, 2):
        raise KVBufferNotApplicable(f"{where}: not a [batch, heads, length, head_dim] cache with fixed heads")
    if dims[3].dim_value % 8:  # onnxruntime's CPU kernel refuses other sizes at run time
        raise KVBufferNotApplicable(f"{where}: head_dim {dims[3].dim_value} is not a multiple of 8, which "
                                    "GroupQueryAttention requires")
    return dims[1].dim_value, dims[3].dim_value


def _smoke_run(model: onnx.ModelProto) -> None:
    """Run the rewritten decoder once on zeros (one row, one written position) with onnxruntime's CPU
    provider, so a graph its kernels refuse is refused here, before anything is saved.

    Raises:
        KVBufferNotApplicable: onnxruntime cannot load or run it (its first message line).
    """
    import onnxruntime as ort

    if model.ByteSize() >= 2**31 - 1:
        return  # cannot be handed over in memory; validation runs it from the file
    from runtime.sessions import ORT_TYPES

    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        feeds: dict[str, np.ndarray] = {}
        for arg in session.get_inputs():
            shape = [dim if isinstance(dim, int) else 2 if dim == "capacity" else 1 for dim in arg.shape]
            feeds[arg.name] = np.zeros(shape, dtype=ORT_TYPES[arg.type])
        feeds[TOTAL_SEQUENCE_LENGTH] = np.array(1, dtype=np.int32)
        session.run(None, feeds)
    except Exception as err:  # noqa: BLE001 - onnxruntime raises several types; any failure means "not here"
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise KVBufferNotApplicable(f"onnxruntime cannot run the rewritten decoder ({first[:200]})") from None


def _rewrite(model: onnx.ModelProto, graph: _Graph, layers: list[_Layer]) -> None:
    g = model.graph
    g.input.append(helper.make_tensor_value_info(SEQLENS_K, TensorProto.INT32, ["batch_size"]))
    g.input.append(helper.make_tensor_value_info(TOTAL_SEQUENCE_LENGTH, TensorProto.INT32, []))
    new = _NewNodes(g)
    # past length (int64 [1]) = seqlens_k[0]: every row has the same length in this runtime
    past_len = new.node("Cast", [new.node("Slice", [SEQLENS_K, new.ints("zero", 0), new.ints("one", 1)])],
                        to=TensorProto.INT64)
    total_len = new.node("Add", [past_len, new.ints("one", 1)])
    batch = new.node("Shape", [SEQLENS_K])
    replaced: dict[str, str] = {}  # output of a removed Shape node -> the computed shape that replaces it
    removed: set[int] = set()
    for index, layer in enumerate(layers):
        heads, head_dim = new.ints(f"heads.{index}", layer.heads), new.ints(f"head_dim.{index}", layer.head_dim)
        query_len = new.node("Slice", [new.node("Shape", [layer.query]), new.ints("one", 1), new.ints("two", 2)])
        shapes = [(state.input_name, [batch, heads, past_len, head_dim]) for state in (layer.key, layer.value)]
        shapes += [(state.output_name or "", [batch, heads, total_len, head_dim]) for state in (layer.key, layer.value)]
        shapes.append((layer.context, [batch, heads, query_len, head_dim]))
        for tensor, dims in shapes:
            readers = [n for n in graph.readers.get(tensor, []) if n.op_type == "Shape"]
            if readers:
                full = new.node("Concat", dims, axis=0)
                for shape_node in readers:
                    replaced[shape_node.output[0]] = _sliced_shape(new, full, shape_node)
                    removed.add(id(shape_node))
        bias = layer.bias[0] if layer.bias else ""
        for more in layer.bias[1:]:
            bias = new.node("Add", [bias, more])
        new.nodes.append(helper.make_node(
            "GroupQueryAttention",
            [layer.query, layer.new_key, layer.new_value, layer.key.input_name, layer.value.input_name, SEQLENS_K,
             TOTAL_SEQUENCE_LENGTH, "", "", "", bias],
            [layer.output, layer.key.output_name or "", layer.value.output_name or ""],
            name=f"{_PREFIX}attention.{index}", domain="com.microsoft", num_heads=layer.heads,
            kv_num_heads=layer.heads, scale=layer.scale))
        removed.update(id(graph.producer[t]) for t in (layer.output, layer.key.output_name, layer.value.output_name))
    kept = [node for node in g.node if id(node) not in removed]
    for node in kept:
        node.input[:] = [replaced.get(name, name) for name in node.input]
    del g.node[:]
    g.node.extend(_topological(new.nodes + kept, graph))
    _remove_dead(g)
    buffered = {name for layer in layers for s in (layer.key, layer.value) for name in (s.input_name, s.output_name)}
    for value in [*g.input, *g.output]:
        if value.name in buffered:
            value.type.tensor_type.shape.dim[2].dim_param = "capacity"
    del g.value_info[:]  # shapes of removed/renamed tensors would be stale
    if not any(opset.domain == "com.microsoft" for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))


class _NewNodes:
    """The nodes and int64 constants the rewrite adds, with names of their own."""

    def __init__(self, graph: onnx.GraphProto):
        self.graph = graph
        self.nodes: list[onnx.NodeProto] = []
        self._constants: set[str] = set()

    def ints(self, name: str, *values: int) -> str:
        """An int64 [len(values)] initializer."""
        name = _PREFIX + name
        if name not in self._constants:
            self.graph.initializer.append(numpy_helper.from_array(np.array(values, np.int64), name))
            self._constants.add(name)
        return name

    def node(self, op_type: str, inputs: list[str], **attrs) -> str:
        """Add a one-output node; returns its output's name."""
        output = f"{_PREFIX}{op_type}.{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, inputs, [output], **attrs))
        return output


def _sliced_shape(new: _NewNodes, full: str, shape_node: onnx.NodeProto) -> str:
    """What `shape_node` (a Shape, maybe with start/end) returned, read from the computed shape `full`."""
    start, end = _attr(shape_node, "start", 0), _attr(shape_node, "end", None)
    if (start, end) == (0, None):
        return full
    bounds = [new.ints(f"start.{start}", start), new.ints(f"end.{end}", end if end is not None else 2**62)]
    return new.node("Slice", [full, *bounds])


def _topological(nodes: list[onnx.NodeProto], graph: _Graph) -> list[onnx.NodeProto]:
    """Order nodes so each comes after the producers of its inputs."""
    available = set(graph.inputs) | set(graph.initializers) | {SEQLENS_K, TOTAL_SEQUENCE_LENGTH, ""}
    pending, ordered = list(nodes), []
    producers = {name for node in nodes for name in node.output}
    while pending:
        progress = []
        for node in pending:
            if all(name in available or name not in producers for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                progress.append(node)
        if len(progress) == len(pending):
            raise KVBufferNotApplicable("the rewritten decoder has a cycle")
        pending = progress
    return ordered


def _remove_dead(g: onnx.GraphProto) -> None:
    """Drop nodes (and initializers) whose outputs nothing reads."""
    needed = {value.name for value in g.output}
    alive = []
    for node in reversed(list(g.node)):
        if any(name in needed for name in node.output):
            alive.append(node)
            needed.update(node.input)
    del g.node[:]
    g.node.extend(reversed(alive))
    unused = [init for init in g.initializer if init.name not in needed]
    for init in unused:
        g.initializer.remove(init)
