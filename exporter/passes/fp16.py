"""--dtype fp16: weights and activations in float16 (for CUDA), keeping what would overflow in float32.

float16's largest value is 65504. T5 is known to overflow in fp16: its feed-forward output, and the
residual stream it adds into, grow past that range in larger checkpoints (transformers keeps T5's
`wo` in fp32 for that reason), and every RMS or layer norm squares its input (|x| > 256 already
overflows). Rather than a list of modules per architecture, the pass measures: it runs each fp32
graph on the sample inputs, records the largest |value| of every tensor a node reads or writes, and
keeps in float32 every node that touches a tensor above FP16_SAFE_MAGNITUDE, a margin of 64 below the
float16 maximum because real inputs reach further than two sample sentences. onnxruntime's float16
converter inserts the casts at the borders. Decisions are made by node name across all graphs at once,
so the two decoders keep the same nodes in fp32 and share their weights once merged.

The graphs' inputs and outputs become float16 too (the cache, the encoder output, the logits): the
runtime creates and feeds states with the element types the graphs declare. What this does not catch
(an input far outside the samples) shows up as non-finite logits in validation, which then fails the
export with an explanation, rather than writing a model that produces garbage.
"""

from __future__ import annotations

import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx

from exporter.graph_runner import GraphRunner, cpu_session
from exporter.passes import save_graph
from runtime.manifest import Manifest

FP16_MAX = 65504.0
FP16_SAFE_MAGNITUDE = FP16_MAX / 64  # ~1024


def convert_graphs_to_fp16(export_dir: Path, manifest: Manifest, inputs: tuple[np.ndarray, np.ndarray]) -> int:
    """Convert every graph of `manifest` in place. inputs: sample input_ids, attention_mask [batch, src_len] int64.

    Returns the number of nodes kept in float32 (over all graphs).
    """
    from onnxruntime.transformers.onnx_model import OnnxModel

    files = [f for f in (manifest.encoder_file, manifest.first_step_file, manifest.decoder_file) if f]
    keep_fp32 = _overflowing_nodes(export_dir, manifest, inputs)
    kept = 0
    for file in files:
        model = _with_node_names(onnx.load(export_dir / file))
        block = [node.name for node in model.graph.node if node.name in keep_fp32]
        kept += len(block)
        converted = OnnxModel(model)
        # Symbolic shape inference (not onnx's) types every tensor, fused com.microsoft ops included (--optimize).
        converted.convert_float_to_float16(use_symbolic_shape_infer=True, keep_io_types=False, node_block_list=block)
        _without_round_trips(_without_duplicate_casts(converted.model))
        converted.topological_sort()  # the converter appends the casts it inserts at the end of the node list
        save_graph(converted.model, export_dir / file)
    return kept


def _without_duplicate_casts(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnxruntime's converter inserts one Cast per blocked consumer of a float16 tensor, all writing the
    same name (`<tensor>_cast_to_fp32`), which breaks single assignment; they are identical, keep the first."""
    written: set[str] = set()
    nodes = []
    for node in model.graph.node:
        if node.op_type == "Cast" and node.output[0] in written:
            continue
        written.update(node.output)
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    described: set[str] = set()
    value_info = [v for v in model.graph.value_info if not (v.name in described or described.add(v.name))]
    del model.graph.value_info[:]
    model.graph.value_info.extend(value_info)
    return model


def _without_round_trips(model: onnx.ModelProto) -> onnx.ModelProto:
    """Let float32 nodes pass float32 tensors to each other directly.

    onnxruntime's converter computes a blocked node in float32 but stores every tensor in float16: it
    casts each blocked node's output to float16 and back to float32 for the next blocked node. For a
    tensor beyond the float16 range that round trip is the overflow itself. Here every
    Cast(to fp32) of a Cast(to fp16) is bypassed (readers take the original float32 tensor, which is
    only more precise), and float16 casts nobody reads any more are dropped.
    """
    graph = model.graph
    producer = {output: node for node in graph.node for output in node.output}
    element_type = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)}
    element_type.update({tensor.name: tensor.data_type for tensor in graph.initializer})
    replaced: dict[str, str] = {}
    for node in graph.node:
        if _cast_to(node) != onnx.TensorProto.FLOAT:
            continue
        source = producer.get(node.input[0])
        # Only a cast down from float32 (one the converter added after a blocked node), not a graph's own
        # Cast that the converter retargeted to float16, whose input may be anything.
        if source is not None and _cast_to(source) == onnx.TensorProto.FLOAT16 and \
                element_type.get(source.input[0]) == onnx.TensorProto.FLOAT:
            replaced[node.output[0]] = source.input[0]
    nodes = [node for node in graph.node if node.output[0] not in replaced or _cast_to(node) is None]
    for node in nodes:
        node.input[:] = [replaced.get(name, name) for name in node.input]
    read = {name for node in nodes for name in node.input} | {output.name for output in graph.output}
    nodes = [node for node in nodes if _cast_to(node) != onnx.TensorProto.FLOAT16 or node.output[0] in read]
    del graph.node[:]
    graph.node.extend(nodes)
    return model


def _cast_to(node: onnx.NodeProto) -> int | None:
    """The target type of a Cast node, None for any other node."""
    if node.op_type != "Cast":
        return None
    return next(attribute.i for attribute in node.attribute if attribute.name == "to")


def _with_node_names(model: onnx.ModelProto) -> onnx.ModelProto:
    """Name the unnamed nodes (by op type and position), so a block list can refer to every node."""
    for index, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{index}"
    return model


def _overflowing_nodes(export_dir: Path, manifest: Manifest, inputs: tuple[np.ndarray, np.ndarray]) -> set[str]:
    """Names of the nodes that read or write a tensor whose largest |value| on the samples exceeds
    FP16_SAFE_MAGNITUDE, in any graph."""
    recorded: dict[str, list[dict[str, np.ndarray]]] = defaultdict(list)
    runner = GraphRunner(export_dir, manifest, on_run=lambda file, feeds: recorded[file].append(dict(feeds)))
    input_ids, attention_mask = inputs
    # A first step and three cached steps, fed the start token and then a few of the inputs' own tokens.
    start = np.full((input_ids.shape[0], 1), manifest.decoder_start_token_id, dtype=np.int64)
    runner.decode(runner.encode(input_ids, attention_mask), attention_mask,
                  np.concatenate([start, input_ids[:, :3]], axis=1))

    overflowing: set[str] = set()
    probe_dir = Path(tempfile.mkdtemp(prefix=".fp16-probe-", dir=export_dir))
    try:
        for file, runs in recorded.items():
            model = _with_node_names(onnx.load(export_dir / file))
            largest = _largest_values(model, runs, probe_dir / file)
            large = {name for name, value in largest.items() if value > FP16_SAFE_MAGNITUDE}
            overflowing |= {node.name for node in model.graph.node
                            if any(name in large for name in (*node.input, *node.output))}
    finally:
        shutil.rmtree(probe_dir, ignore_errors=True)
    return overflowing


def _largest_values(model: onnx.ModelProto, runs: list[dict[str, np.ndarray]], probe_path: Path) -> dict[str, float]:
    """Largest |value| of every float tensor of the graph (inputs and every node output) over `runs`."""
    declared = {output.name for output in model.graph.output}
    for node in model.graph.node:
        for name in node.output:
            if name and name not in declared:
                model.graph.output.append(onnx.ValueInfoProto(name=name))  # type left to onnxruntime to infer
                declared.add(name)
    save_graph(model, probe_path)
    session = cpu_session(probe_path)
    names = [output.name for output in session.get_outputs() if output.type in ("tensor(float)", "tensor(float16)")]
    largest: dict[str, float] = defaultdict(float)
    for feeds in runs:
        values = dict(zip(names, session.run(names, feeds)))
        values.update({name: value for name, value in feeds.items() if np.issubdtype(value.dtype, np.floating)})
        for name, value in values.items():
            if value.size:
                largest[name] = max(largest[name], float(np.abs(value.astype(np.float32)).max()))
    return largest
