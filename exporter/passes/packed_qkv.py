"""One Q/K/V projection per self-attention layer, feeding GroupQueryAttention's packed input.

After `kv_buffer` every layer's GroupQueryAttention reads three projections of the same hidden state,
`q = x @ Wq`, `k = x @ Wk`, `v = x @ Wv` (each maybe `+ b`): three matrix-vector products a decoder
step, each a kernel call with its own dispatch and its own pass over `x`. This pass concatenates the
three weights into one `[hidden, 3 * hidden]` matrix, runs one product, and hands its output to the
node's packed `query` input (key and value left empty), which onnxruntime splits where it reads it.

Every output column is the same dot product as before, so the outputs are the same numbers:
- float32: `MatMul(x, [Wq | Wk | Wv])`, with `Add(.., [bq | bk | bv])` where all three had a bias;
- int8 (the dynamic quantizer's `Mul(Cast(MatMulInteger(xq, W, x_zero, w_zero)), x_scale * w_scale)`):
  the weights concatenated, the per-tensor weight scales repeated column by column into one
  `[3 * hidden]` scale (the float multiplier after MatMulInteger takes per-column values; zero points
  too where the three differ), so each column is still multiplied by `x_scale * its own w_scale`.
Measured on the t5-small shape (bench/README.md): int8 greedy batch 1 ~4% faster, fp32 ~1.5%, and the
same tokens and beam scores bit for bit.

A layer whose three inputs do not have that shape (another reader of a projection's output, a bias on
some of them only, a 4-bit MatMulNBits, different inputs) is left as it is; a decoder with no layer
packed raises `PackedQKVNotApplicable`. Nothing here knows an architecture.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from exporter.passes import save_graph
from runtime.manifest import Manifest

_PREFIX = "packed_qkv/"


class PackedQKVNotApplicable(Exception):
    """No self-attention layer of the decoder has three projections this pass can pack (the message says
    why); the graph file is unchanged. Not an S2SError: the export keeps its three projections."""


@dataclass(frozen=True)
class _Projection:
    """One of q, k, v as matched: `nodes` (its own, each read only by the next) compute it from `source`."""

    nodes: tuple[onnx.NodeProto, ...]
    source: tuple[str, ...]  # float32: (x,); int8: (x quantized, x zero point, x scale)
    weight: np.ndarray  # [hidden, out]
    weight_zero: np.ndarray | None  # int8: the weight's zero point (a scalar)
    weight_scale: float | None  # int8
    bias: np.ndarray | None  # [out]


def pack_qkv(export_dir: Path, manifest: Manifest) -> Manifest:
    """Rewrite `export_dir / manifest.decoder_file` in place (see the module docstring). Returns the
    manifest as it was: the decoder's inputs and outputs do not change.

    Raises:
        PackedQKVNotApplicable: no layer matches; nothing was changed.
    """
    path = export_dir / manifest.decoder_file
    model = onnx.load(path)
    graph = model.graph
    index = _Index(graph)
    attention = [node for node in index.nodes if node.op_type == "GroupQueryAttention"]
    if not attention:
        raise PackedQKVNotApplicable("the decoder has no GroupQueryAttention (the kv-buffer pass did not run)")
    matched, why = [], ""
    for node in attention:
        try:
            projections = [index.projection(name) for name in node.input[:3]]
            _check_packable(projections)
        except PackedQKVNotApplicable as err:
            why = str(err)
            continue
        matched.append((node, projections))
    if not matched:
        raise PackedQKVNotApplicable(why)
    _rewrite(graph, index.nodes, matched)
    _drop_unread_initializers(graph)
    del graph.value_info[:]  # shapes of removed tensors would be stale
    save_graph(model, path)
    return manifest


class _Index:
    """Who produces and who reads each tensor of one graph, and its constants."""

    def __init__(self, graph: onnx.GraphProto):
        # One snapshot of the node objects: the rewrite tells them apart by identity, and protobuf hands
        # out new wrappers once the repeated field is rebuilt.
        self.nodes = list(graph.node)
        self.producer = {name: node for node in self.nodes for name in node.output}
        self.readers: dict[str, int] = {}
        for node in self.nodes:
            for name in node.input:
                self.readers[name] = self.readers.get(name, 0) + 1
        self.outputs = {value.name for value in graph.output}
        self.initializers = {init.name: init for init in graph.initializer}

    def constant(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        if node is not None and node.op_type == "Identity":  # the exporter's copy of an equal tensor
            return self.constant(node.input[0])
        return None

    def own(self, name: str, op_type: str) -> onnx.NodeProto:
        """The `op_type` node making `name`, which nothing but one node reads."""
        node = self.producer.get(name)
        if node is None or node.op_type != op_type:
            found = node.op_type if node is not None else "a graph input"
            raise PackedQKVNotApplicable(f"{name!r} comes from {found}, expected {op_type}")
        if self.readers.get(name, 0) != 1 or name in self.outputs:
            raise PackedQKVNotApplicable(f"{name!r} is read by {self.readers.get(name, 0)} nodes, expected one")
        return node

    def projection(self, name: str) -> _Projection:
        """`name` as a projection: [Add(bias)] after a float32 MatMul or the dynamic quantizer's int8 chain."""
        nodes: list[onnx.NodeProto] = []
        bias = None
        producer = self.producer.get(name)
        if producer is not None and producer.op_type == "Add":
            add = self.own(name, "Add")
            constants = [self.constant(operand) for operand in add.input]
            if sum(c is not None for c in constants) != 1:
                raise PackedQKVNotApplicable(f"{add.name!r}: an Add of two computed tensors")
            at = 0 if constants[0] is not None else 1
            bias, name = constants[at], add.input[1 - at]
            nodes.append(add)
            producer = self.producer.get(name)
        found = self._float(name) if getattr(producer, "op_type", "") == "MatMul" else self._int8(name)
        if bias is not None and bias.shape != (found.weight.shape[1],):
            raise PackedQKVNotApplicable(f"a bias of shape {bias.shape} on {found.weight.shape[1]} columns")
        return _Projection((*found.nodes, *nodes), found.source, found.weight, found.weight_zero,
                           found.weight_scale, bias)

    def _float(self, name: str) -> _Projection:
        matmul = self.own(name, "MatMul")
        weight = self.constant(matmul.input[1])
        if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
            raise PackedQKVNotApplicable(f"{matmul.name!r}: not a product with a float32 weight matrix")
        return _Projection((matmul,), (matmul.input[0],), weight, None, None, None)

    def _int8(self, name: str) -> _Projection:
        mul = self.own(name, "Mul")
        cast_at = next((i for i, operand in enumerate(mul.input)
                        if getattr(self.producer.get(operand), "op_type", "") == "Cast"), None)
        if cast_at is None:
            raise PackedQKVNotApplicable(f"{mul.name!r}: neither a MatMul nor a dequantized MatMulInteger")
        cast = self.own(mul.input[cast_at], "Cast")
        integer = self.own(cast.input[0], "MatMulInteger")
        scales = self.own(mul.input[1 - cast_at], "Mul")
        weight = self.constant(integer.input[1])
        zero_name = integer.input[3] if len(integer.input) > 3 else ""
        zero = self.constant(zero_name) if zero_name else None
        scale_at = next((i for i, operand in enumerate(scales.input) if self.constant(operand) is not None), None)
        weight_scale = self.constant(scales.input[scale_at]) if scale_at is not None else None
        x_zero = integer.input[2] if len(integer.input) > 2 else ""
        if (weight is None or weight.ndim != 2 or weight_scale is None or weight_scale.size != 1
                or (zero_name and (zero is None or zero.size != 1))):
            raise PackedQKVNotApplicable(f"{integer.name!r}: not a per-tensor quantized weight matrix")
        assert scale_at is not None
        source = (integer.input[0], x_zero, scales.input[1 - scale_at])
        return _Projection((integer, cast, scales, mul), source, weight, zero, float(weight_scale.reshape(())), None)


def _check_packable(projections: list[_Projection]) -> None:
    first = projections[0]
    if any(p.source != first.source for p in projections):
        raise PackedQKVNotApplicable("q, k and v are not projections of one input")
    if any(p.weight.shape[0] != first.weight.shape[0] or p.weight.dtype != first.weight.dtype for p in projections):
        raise PackedQKVNotApplicable("q, k and v weights differ in rows or type")
    if len({p.bias is None for p in projections}) != 1:
        raise PackedQKVNotApplicable("a bias on some of q, k and v only")


def _rewrite(graph: onnx.GraphProto, nodes: list[onnx.NodeProto],
             matched: list[tuple[onnx.NodeProto, list[_Projection]]]) -> None:
    """Each layer's packed projection where its first removed node was (every source is made before
    it), each attention node pointed at it, the three projections dropped. `nodes`: the graph's nodes."""
    removed: set[int] = set()
    added_at: dict[int, list[onnx.NodeProto]] = {}
    for layer, (node, projections) in enumerate(matched):
        output, added, initializers = _packed(f"{_PREFIX}{layer}", projections)
        graph.initializer.extend(initializers)
        own = {id(n) for p in projections for n in p.nodes}
        added_at[next(id(n) for n in nodes if id(n) in own)] = added
        removed |= own
        node.input[0], node.input[1], node.input[2] = output, "", ""
    ordered = []
    for n in nodes:
        ordered += added_at.get(id(n), [])
        if id(n) not in removed:
            ordered.append(n)
    del graph.node[:]
    graph.node.extend(ordered)


def _packed(name: str, projections: list[_Projection]) -> tuple[str, list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes and initializers of one packed projection; returns its output's name too."""
    weight = np.concatenate([p.weight for p in projections], axis=1)
    initializers = [numpy_helper.from_array(weight, f"{name}.weight")]
    first = projections[0]
    output = f"{name}.qkv"
    if first.weight_scale is None:  # float32
        nodes = [helper.make_node("MatMul", [first.source[0], f"{name}.weight"], [output], name=f"{name}.matmul")]
    else:
        x, x_zero, x_scale = first.source
        scale = np.concatenate([np.full(p.weight.shape[1], p.weight_scale, np.float32) for p in projections])
        zeros = [p.weight_zero.reshape(()) if p.weight_zero is not None else 0 for p in projections]
        if len({int(z) for z in zeros}) == 1:  # per tensor stays per tensor (s2s.json says per_channel: False)
            zero = np.array(zeros[0], weight.dtype)
        else:
            zero = np.concatenate([np.full(p.weight.shape[1], z, weight.dtype) for p, z in zip(projections, zeros)])
        initializers += [numpy_helper.from_array(scale, f"{name}.weight_scale"),
                         numpy_helper.from_array(zero, f"{name}.weight_zero")]
        nodes = [helper.make_node("MatMulInteger", [x, f"{name}.weight", x_zero, f"{name}.weight_zero"],
                                  [f"{name}.int32"], name=f"{name}.matmul_integer"),
                 helper.make_node("Cast", [f"{name}.int32"], [f"{name}.float"], to=onnx.TensorProto.FLOAT,
                                  name=f"{name}.cast"),
                 helper.make_node("Mul", [x_scale, f"{name}.weight_scale"], [f"{name}.scale"], name=f"{name}.scales"),
                 helper.make_node("Mul", [f"{name}.float", f"{name}.scale"], [output], name=f"{name}.dequantize")]
    if first.bias is not None:
        initializers.append(numpy_helper.from_array(np.concatenate([p.bias for p in projections]), f"{name}.bias"))
        nodes.append(helper.make_node("Add", [output, f"{name}.bias"], [f"{name}.biased"], name=f"{name}.add"))
        output = f"{name}.biased"
    return output, nodes, initializers


def _drop_unread_initializers(graph: onnx.GraphProto) -> None:
    read = {name for node in graph.node for name in node.input}
    unread = [init for init in graph.initializer if init.name not in read]
    for init in unread:
        graph.initializer.remove(init)
