"""Cross-attention K/V once, beside the encoder: optimum's split export -> `encoder.onnx` + `decoder.onnx`.

Optimum writes an encoder, a first-step decoder (`decoder_model.onnx`: no cache inputs; it computes
every layer's cross-attention K/V from `encoder_hidden_states` and emits them as
`present.{i}.encoder.{key,value}`) and a cached decoder (`decoder_with_past_model.onnx`: takes them
back as `past_key_values.{i}.encoder.*` and does not re-emit them). This pass cuts the K/V
computation out of the first-step decoder and appends it to the encoder graph, so that:

- `encoder.onnx`: input_ids, attention_mask -> last_hidden_state and every `present.{i}.encoder.*`
  [batch, heads, src_len, head_dim], computed once per input;
- `decoder.onnx`: the cached decoder as optimum wrote it, run from step 0 with a self-attention
  cache of length 0 (the manifest's `init="empty"`), so no first-step graph is stored at all.
  That the cached graph accepts an empty cache is a property of optimum's export, not proven here
  (it holds for T5, mT5, LongT5, BART, mBART, Marian, Pegasus, M2M100, Blenderbot(-Small)); the
  exporter's validation compares step 0's logits with PyTorch.

The K/V projection weights then live in the encoder only (the cached decoder never had them), and no
other decoder weight is copied: the cut holds the projections and the reshapes/transposes after them.

Why it is not a plain `onnx.utils.Extractor` call: the K/V reshapes take the batch size from the
*decoder* hidden states (`batch_size = hidden_states.shape[0]` in the attention module), so the cut
from `encoder_hidden_states` would drag in `input_ids` and the decoder layers below. Those Shape
nodes are rewritten to read `encoder_hidden_states` instead, which is only correct when nothing but
their dimension 0 is used and that dimension is the batch in both tensors; the pass proves both from
the graph (consumers are `Gather` index 0 or `Slice` [0:1]; symbolic shape inference gives the same
batch symbol) and otherwise refuses, naming the node, without touching the directory. Nothing here
knows an architecture: names come from the manifest optimum's layout yields (runtime/optimum_layout.py).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from exporter.passes import save_graph
from runtime.manifest import ENCODER_HIDDEN_STATES, LAST_HIDDEN_STATE, Manifest
from runtime.optimum_layout import (
    ENCODER_FILE as OPTIMUM_ENCODER_FILE,
    FIRST_STEP_FILE,
    MERGED_DECODER_FILE,
    WITH_PAST_FILE,
    manifest_from_optimum_dir,
)

ENCODER_FILE = "encoder.onnx"
DECODER_FILE = "decoder.onnx"

# Prepended to the names of the nodes, tensors and initializers taken from the decoder, so that they
# cannot clash with the encoder's (both graphs come from one export and reuse names like "onnx::MatMul_7").
_PREFIX = "cross_kv/"

# Initializers with more elements than this are weights, never shapes or indices.
_INFERENCE_VALUE_LIMIT = 1024


class CrossAttentionNotMovable(Exception):
    """The pass does not apply to this export (the message says why); the directory is unchanged.

    Not an S2SError: there is nothing for the user to fix, the exporter keeps optimum's layout.
    """


def move_cross_attention_to_encoder(export_dir: Path) -> Manifest:
    """Rewrite optimum's split export in `export_dir` into encoder.onnx + decoder.onnx (see module docstring).

    Needs encoder_model.onnx, decoder_model.onnx and decoder_with_past_model.onnx (optimum's merged
    decoder, if present, is not read). On success, optimum's graph files are deleted (the merged
    decoder too) and the manifest of the new layout is returned; the caller writes it.

    Raises:
        CrossAttentionNotMovable: the cross-attention K/V cannot be proven to depend on the encoder
            output alone, or the directory is not optimum's split layout; nothing was changed.
    """
    export_dir = Path(export_dir)
    missing = [name for name in (OPTIMUM_ENCODER_FILE, FIRST_STEP_FILE, WITH_PAST_FILE)
               if not (export_dir / name).is_file()]
    if missing:
        raise CrossAttentionNotMovable(f"optimum's split graphs are needed, {missing} missing")
    optimum_layout = manifest_from_optimum_dir(export_dir)
    fixed = [state for state in optimum_layout.states if state.kind == "fixed"]
    if not fixed:
        raise CrossAttentionNotMovable("the decoder has no cross-attention cache")
    cross_kv = [state.output_name for state in fixed if state.output_name is not None]  # optimum names all

    # The states were read from the merged graph if there is one: the cached graph must have the same IO.
    with_past = onnx.load(export_dir / WITH_PAST_FILE, load_external_data=False)  # its IO only, for now
    with_past_inputs = {value.name for value in with_past.graph.input}
    with_past_outputs = {value.name for value in with_past.graph.output}
    unfed = [state.input_name for state in optimum_layout.states if state.input_name not in with_past_inputs] + \
        [state.output_name for state in optimum_layout.states
         if state.kind == "grows" and state.output_name not in with_past_outputs]
    if unfed:
        raise CrossAttentionNotMovable(f"{WITH_PAST_FILE} lacks the cache input or output {unfed[0]!r}")
    recomputed = sorted(set(cross_kv) & with_past_outputs)
    if recomputed:
        raise CrossAttentionNotMovable(f"{WITH_PAST_FILE} recomputes the cross-attention K/V ({recomputed[0]}, ...)")

    first_step = onnx.load(export_dir / FIRST_STEP_FILE)
    nodes = _cross_kv_nodes(first_step, cross_kv, ENCODER_HIDDEN_STATES)
    encoder = onnx.load(export_dir / OPTIMUM_ENCODER_FILE)
    _append_cross_kv(encoder, first_step, nodes, cross_kv)
    del first_step

    save_graph(encoder, export_dir / ENCODER_FILE)
    del encoder
    save_graph(onnx.load(export_dir / WITH_PAST_FILE), export_dir / DECODER_FILE)  # with its external data, if any
    for name in (OPTIMUM_ENCODER_FILE, FIRST_STEP_FILE, WITH_PAST_FILE, MERGED_DECODER_FILE):
        for path in export_dir.glob(name + "*"):  # the graph and any external-data file beside it
            path.unlink()

    states = tuple(replace(state, output_name=None, init="encoder", encoder_output=state.output_name)
                   if state.kind == "fixed" else state for state in optimum_layout.states)
    return replace(optimum_layout, encoder_file=ENCODER_FILE, decoder_file=DECODER_FILE, first_step_file=None,
                   use_cache_branch=None, states=states)


def _cross_kv_nodes(model: onnx.ModelProto, outputs: list[str], source: str) -> list[onnx.NodeProto]:
    """The nodes of `model` that compute `outputs` from the graph input `source` alone, in graph order.

    Shape nodes whose input derives from another graph input are replaced by `Shape(source)[0:1]`,
    after proving that only their dimension 0 is read and that it is `source`'s batch dimension.

    Raises:
        CrossAttentionNotMovable: naming the node that makes the outputs depend on another input.
    """
    graph = model.graph
    producer = {name: node for node in graph.node for name in node.output}
    constants = {init.name for init in graph.initializer}
    graph_inputs = {value.name for value in graph.input} - constants
    if source not in graph_inputs:
        raise CrossAttentionNotMovable(f"the first-step decoder has no input {source!r}")
    not_computed = [name for name in outputs if name not in producer]
    if not_computed:
        raise CrossAttentionNotMovable(f"the first-step decoder does not compute {not_computed[0]!r}")
    depends = _input_dependencies(graph, graph_inputs)

    kept: dict[int, onnx.NodeProto] = {}  # id(node) -> node
    batch_shapes: list[onnx.NodeProto] = []  # Shape nodes to read `source` instead
    pending = [(name, producer[name]) for name in outputs]  # (tensor, a node it leads to)
    seen: set[str] = set()
    while pending:
        name, reader = pending.pop()
        if not name or name in seen or name in constants:
            continue
        seen.add(name)
        if name in graph_inputs:
            if name != source:
                raise CrossAttentionNotMovable(
                    f"the cross-attention K/V depend on the decoder input {name!r} through node "
                    f"{reader.name!r} ({reader.op_type}), not only through a batch size")
            continue
        node = producer[name]
        if id(node) in kept:
            continue
        if any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for attr in node.attribute):
            raise CrossAttentionNotMovable(f"control flow ({node.op_type} {node.name!r}) computes cross-attention K/V")
        kept[id(node)] = node
        if node.op_type == "Shape" and depends[node.input[0]] - {source}:
            batch_shapes.append(node)  # its input is not followed: it will read `source`
            continue
        pending.extend((tensor, node) for tensor in node.input)

    nodes = [node for node in graph.node if id(node) in kept]
    if batch_shapes:
        _check_batch_only(model, batch_shapes, nodes, source)
    rewritten = {id(node): onnx.helper.make_node("Shape", [source], list(node.output), name=node.name, start=0, end=1)
                 for node in batch_shapes}
    return [rewritten.get(id(node), node) for node in nodes]


def _input_dependencies(graph: onnx.GraphProto, graph_inputs: set[str]) -> dict[str, frozenset[str]]:
    """For every tensor, the graph inputs it is computed from (nodes are in topological order)."""
    depends: dict[str, frozenset[str]] = {name: frozenset([name]) for name in graph_inputs}
    for node in graph.node:
        found = frozenset().union(*(depends.get(name, frozenset()) for name in _node_reads(node)))
        for name in node.output:
            depends[name] = found
    return depends


def _node_reads(node: onnx.NodeProto) -> list[str]:
    """The node's inputs, plus the outer-scope names its subgraphs (If, Loop, Scan bodies) read."""
    names = list(node.input)
    for attr in node.attribute:
        for subgraph in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
            for inner in subgraph.node:
                names.extend(_node_reads(inner))
    return names


def _check_batch_only(model: onnx.ModelProto, shapes: list[onnx.NodeProto], nodes: list[onnx.NodeProto],
                      source: str) -> None:
    """Prove each Shape node's output is read at index 0 only, and that index 0 is `source`'s batch.

    Raises:
        CrossAttentionNotMovable: naming the Shape node and what else is read.
    """
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in nodes:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for shape in shapes:
        attrs = {attr.name: attr.i for attr in shape.attribute}
        if attrs.get("start", 0) != 0:
            raise CrossAttentionNotMovable(f"Shape {shape.name!r} starts at dimension {attrs['start']}, not at the "
                                           "batch")
        if attrs.get("end") == 1:  # it returns the batch size alone
            continue
        for reader in readers.get(shape.output[0], []):
            if not _reads_index_0(model.graph, reader, shape.output[0]):
                raise CrossAttentionNotMovable(
                    f"{reader.op_type} {reader.name!r} reads more of Shape {shape.name!r} than its batch dimension")

    inferred = _symbolic_shapes(model)
    batch = inferred.get(source, [None])[0]
    if not isinstance(batch, str):
        raise CrossAttentionNotMovable(f"{source!r} has no symbolic batch dimension ({batch!r})")
    for shape in shapes:
        dims = inferred.get(shape.input[0])
        if not dims or dims[0] != batch:
            raise CrossAttentionNotMovable(
                f"cannot prove that dimension 0 of {shape.input[0]!r} (read by Shape {shape.name!r}) is the batch "
                f"{batch!r} of {source!r}: its inferred shape is {dims}")


def _symbolic_shapes(model: onnx.ModelProto) -> dict[str, list]:
    """Every tensor's shape by onnxruntime's symbolic shape inference: dims are ints or symbol names."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    # The inference copies the model it is given: it gets one whose large initializers are graph inputs of
    # the same type and shape (it needs their shapes, not their values), so the weights are not copied.
    graph = model.graph
    declared = {value.name for value in graph.input}
    large = {init.name: init for init in graph.initializer if np.prod(init.dims) > _INFERENCE_VALUE_LIMIT}
    as_inputs = [onnx.helper.make_tensor_value_info(name, init.data_type, init.dims)
                 for name, init in large.items() if name not in declared]
    small = [init for init in graph.initializer if init.name not in large]
    light = onnx.helper.make_model(onnx.helper.make_graph(graph.node, graph.name, [*graph.input, *as_inputs],
                                                          graph.output, small),
                                   opset_imports=model.opset_import, ir_version=model.ir_version)
    try:
        inferred = SymbolicShapeInference.infer_shapes(light, auto_merge=False, guess_output_rank=False)
    except Exception as err:  # noqa: BLE001 - the inference raises assorted types on graphs it cannot follow
        raise CrossAttentionNotMovable(f"symbolic shape inference failed on the first-step decoder ({err})") from None
    values = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    return {value.name: [dim.dim_param if dim.HasField("dim_param") else dim.dim_value
                         for dim in value.type.tensor_type.shape.dim] for value in values}


def _reads_index_0(graph: onnx.GraphProto, reader: onnx.NodeProto, shape_output: str) -> bool:
    """Whether `reader` reads only element 0 of the 1-D tensor `shape_output`: Gather index 0, Slice [0:1]."""
    operands = list(reader.input)
    if operands.count(shape_output) != 1 or operands[0] != shape_output:
        return False
    attrs = {attr.name: attr for attr in reader.attribute}
    if reader.op_type == "Gather":
        indices = _constant(graph, operands[1])
        return ("axis" not in attrs or attrs["axis"].i == 0) and indices is not None and indices.size > 0 \
            and not indices.any()
    if reader.op_type == "Slice":
        starts, ends, axes, steps = (_constant(graph, operands[i]) if len(operands) > i and operands[i] else None
                                     for i in range(1, 5))
        return (starts is not None and ends is not None and starts.tolist() == [0] and ends.tolist() == [1]
                and (axes is None or axes.tolist() in ([0], [-1])) and (steps is None or steps.tolist() == [1])
                and len(operands) in (3, 4, 5))
    return False


def _constant(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The value of an initializer or Constant-node output; None for a computed tensor."""
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            attr = node.attribute[0]
            if attr.name == "value":
                return numpy_helper.to_array(attr.t)
            if attr.name in ("value_int", "value_ints"):
                return np.asarray(onnx.helper.get_attribute_value(attr))
            return None
    return None


def _append_cross_kv(encoder: onnx.ModelProto, decoder: onnx.ModelProto, nodes: list[onnx.NodeProto],
                     outputs: list[str]) -> None:
    """Append `nodes` (taken from `decoder`, where they read encoder_hidden_states) to `encoder`, reading
    its last_hidden_state, with the initializers they read; add `outputs` to the encoder's outputs.

    Raises:
        CrossAttentionNotMovable: the two graphs disagree on the hidden states' type, on an opset, or
            on a name; `encoder` is then unchanged.
    """
    hidden = {value.name: value for value in encoder.graph.output}.get(LAST_HIDDEN_STATE)
    source = {value.name: value for value in decoder.graph.input}[ENCODER_HIDDEN_STATES]
    if hidden is None or hidden.type.tensor_type.elem_type != source.type.tensor_type.elem_type:
        raise CrossAttentionNotMovable(f"the encoder's {LAST_HIDDEN_STATE!r} is not the decoder's "
                                       f"{ENCODER_HIDDEN_STATES!r} type")
    opsets = {opset.domain: opset.version for opset in encoder.opset_import}
    for opset in decoder.opset_import:
        if opsets.setdefault(opset.domain, opset.version) != opset.version:
            raise CrossAttentionNotMovable(f"opset {opset.domain or 'ai.onnx'} differs: encoder "
                                           f"{opsets[opset.domain]}, decoder {opset.version}")
    used_functions = {(node.domain, node.op_type) for node in nodes} & \
        {(function.domain, function.name) for function in decoder.functions}
    if used_functions:
        raise CrossAttentionNotMovable(f"the cross-attention K/V use model-local functions {sorted(used_functions)}")

    def renamed(name: str) -> str:
        if name == ENCODER_HIDDEN_STATES:
            return LAST_HIDDEN_STATE
        return name if not name or name in outputs else _PREFIX + name

    read = {name for node in nodes for name in node.input}
    initializers = [init for init in decoder.graph.initializer if init.name in read]
    graph = encoder.graph
    taken = {value.name for value in (*graph.input, *graph.output)} | {init.name for init in graph.initializer} | \
        {name for node in graph.node for name in node.output}
    clashes = sorted(taken & {renamed(name) for name in [*(init.name for init in initializers),
                                                         *(name for node in nodes for name in node.output)]})
    if clashes:
        raise CrossAttentionNotMovable(f"the encoder already has tensors named {clashes[:3]}")
    for init in initializers:
        copied = graph.initializer.add()
        copied.CopyFrom(init)
        copied.name = renamed(init.name)
    for node in nodes:
        copied = graph.node.add()
        copied.CopyFrom(node)
        copied.name = _PREFIX + node.name if node.name else ""
        copied.input[:] = [renamed(name) for name in node.input]
        copied.output[:] = [renamed(name) for name in node.output]
    declared = {value.name: value for value in decoder.graph.output}
    graph.output.extend(declared[name] for name in outputs)
    del encoder.opset_import[:]
    encoder.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in opsets.items())
    encoder.ir_version = max(encoder.ir_version, decoder.ir_version)
