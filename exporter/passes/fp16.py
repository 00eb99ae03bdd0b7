"""--dtype fp16: weights and activations in float16 (for CUDA), keeping in float32 what float16 breaks.

Three things break in float16, and none is specific to one architecture, so the pass measures them on
the graphs rather than keeping a list of modules per model:

- Range. float16's largest value is 65504. T5 is known to overflow: its feed-forward output and the
  residual stream it adds into grow past that range in larger checkpoints (transformers keeps T5's
  `wo` in fp32 for that reason), every RMS or layer norm squares its input (|x| > 256 overflows), and
  attention masks add the float32 minimum. The pass runs each fp32 graph on the sample inputs, records
  the largest |value| of every tensor, and keeps in float32 every node that touches a tensor above
  FP16_SAFE_MAGNITUDE: a margin of 64 below the float16 maximum, because real inputs reach further
  than two sample sentences.
- Index arithmetic. Float math whose result is cast to an integer (T5's relative-position buckets: a
  log of the distance, scaled and floored) picks wrong indices once rounded to float16; transformers
  computes it in float32 whatever the model's dtype. Those nodes stay float32 too.
- Precision before a softmax. float16 keeps 11 significant bits, so a tensor computed from float16
  operands is off by about |value| * 2**-11; a softmax turns an absolute error of its input into a
  relative error of its output (exp(x + e) = exp(x) * (1 + e)). Attention scores can be large: on the
  tiny marian fixture (embeddings scaled by sqrt(d_model), a large init) the first encoder layer's
  reach ~1500, so rounding its queries and keys, or anything they are computed from, moved each
  score by ~1 and the encoder output by 20% (validation refused the export: 0.74 off against 0.35
  allowed; PyTorch's own float16 is 25% off there). A score that large needs every tensor it is
  computed from in float32, however small those are: float16's relative error there becomes an
  absolute error of |score| * 2**-11 all the same. So wherever the live entries of a softmax's input
  (those above -65504: masked ones hold the float minimum, and weigh 0 however they are rounded)
  exceed FP16_SOFTMAX_INPUT on the samples, everything that input is computed from stays float32:
  the walk up stops only at graph inputs, integer tensors and the masks.

onnxruntime's float16 converter does the conversion, on the element types onnxruntime's symbolic
shape inference finds; it computes a blocked node in float32 but stores its output in float16, so the
float16 round trips between two float32 nodes are removed afterwards: a tensor beyond the range is
never stored in float16. Decisions are made by node name over all graphs, so the two decoders keep
the same nodes in float32 and still share their weights once merged.

The graphs' inputs and outputs become float16 (the cache, the encoder output, the logits): the runtime
creates and feeds states with the element types the graphs declare. An overflow the samples did not
reveal shows up as non-finite logits in validation, which then fails the export with an explanation.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from exporter.errors import GraphPassError
from exporter.graph_runner import GraphRunner, cpu_session
from exporter.passes import save_graph
from runtime.errors import first_line
from runtime.manifest import ENCODER_DECODER, Manifest

FP16_MAX = 65504.0
FP16_SAFE_MAGNITUDE = FP16_MAX / 64  # ~1024
# Largest live softmax input computed from float16 tensors. Measured on the marian fixture: rounding
# the tensors that first-layer scores of ~1500 come from changed attention weights by up to 0.06; below
# 256 that is ~1%. Above it, the scores are computed from float32 tensors.
FP16_SOFTMAX_INPUT = 256.0
_SOFTMAX_OPS = ("Softmax", "LogSoftmax")
_INTEGER_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8,
                  onnx.TensorProto.UINT8, onnx.TensorProto.BOOL}
_FLOAT_TYPES = ("tensor(float)", "tensor(float16)")


@dataclass(frozen=True)
class KeptInFloat32:
    """How many float nodes stayed float32 over all graphs, by reason (a node counts once, first reason)."""

    for_range: int  # they touch a value beyond FP16_SAFE_MAGNITUDE on the samples
    for_indices: int  # they compute integer indices
    for_softmax: int  # they compute a softmax input above FP16_SOFTMAX_INPUT

    def describe(self) -> str:
        return (f"kept in fp32 {self.for_range} node(s) whose values on the sample inputs exceed the fp16-safe range, "
                f"{self.for_indices} computing integer indices and {self.for_softmax} computing softmax inputs "
                "too large for fp16's precision")


def convert_graphs_to_fp16(export_dir: Path, manifest: Manifest,
                           inputs: tuple[np.ndarray, np.ndarray]) -> KeptInFloat32:
    """Convert every graph of `manifest` in place. inputs: sample input_ids, attention_mask [batch, src_len] int64.

    Not thread-safe: shape inference runs with the process's working directory changed (_typed).

    Returns how many float nodes stayed float32, and why.

    Raises:
        GraphPassError: onnxruntime's shape inference cannot type every tensor of a graph, or the export
            is not an encoder-decoder.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16
    from onnxruntime.transformers.onnx_model import OnnxModel

    if manifest.kind != ENCODER_DECODER:  # the sample runs below feed an encoder-decoder's graphs
        raise GraphPassError(f"--dtype fp16 converts encoder-decoder exports only, not a {manifest.kind} model; "
                             "export it in fp32 (or with --quantize int8)")
    files = manifest.graph_files
    runs = _sample_runs(export_dir, manifest, inputs)
    overflowing: set[str] = set()
    index_math: set[str] = set()
    softmax_inputs: set[str] = set()
    scratch_dir = Path(tempfile.mkdtemp(prefix=".fp16-", dir=export_dir))
    try:
        for file in files:
            model = _with_node_names(onnx.load(export_dir / file))
            largest, live = _largest_values(model, runs[file], scratch_dir / file)
            large = {name for name, value in largest.items() if value > FP16_SAFE_MAGNITUDE}
            overflowing |= {node.name for node in model.graph.node
                            if any(name in large for name in (*node.input, *node.output))}
            index_math |= _index_math_nodes(model, float_tensors=set(largest))
            softmax_inputs |= _softmax_input_nodes(model, largest, live)
        keep = overflowing | index_math | softmax_inputs
        for file in files:
            model = _typed(_with_node_names(onnx.load(export_dir / file)), file, scratch_dir)
            block = [node.name for node in model.graph.node if node.name in keep]
            converted = OnnxModel(convert_float_to_float16(model, disable_shape_infer=True, keep_io_types=False,
                                                           node_block_list=block))
            converted.remove_cascaded_cast_nodes()
            converted.remove_useless_cast_nodes()
            _without_round_trips(_without_duplicate_casts(converted.model))
            converted.topological_sort()  # the converter appends the casts it inserts at the end of the node list
            save_graph(converted.model, export_dir / file)
    finally:
        shutil.rmtree(scratch_dir, ignore_errors=True)
    return KeptInFloat32(len(overflowing), len(index_math - overflowing),
                         len(softmax_inputs - overflowing - index_math))


def _typed(model: onnx.ModelProto, file: str, scratch_dir: Path) -> onnx.ModelProto:
    """Record the element type of every tensor in value_info, where the float16 converter looks up which
    tensors are float.

    onnxruntime's symbolic shape inference (not onnx's) types every tensor, fused com.microsoft ops
    included (--optimize). Only element types are kept: the shapes it merges can be wrong (onnxruntime
    issue 15521), and the converter needs none. When it cannot type a tensor it saves its partial graph
    as sym_shape_infer_temp.onnx (and its weights) in the working directory, so it runs with the working
    directory moved into `scratch_dir`, inside the export: nothing is written outside it. The working
    directory is process-wide, hence not thread-safe.

    Raises:
        GraphPassError: the inference stopped at a tensor it cannot type.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    working_dir = os.getcwd()
    os.chdir(scratch_dir)
    try:
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=False)
    except Exception as err:  # noqa: BLE001 - it raises a bare Exception("Incomplete symbolic shape inference")
        raise GraphPassError(
            f"--dtype fp16: onnxruntime's shape inference cannot find the element type of every tensor of {file} "
            f"({first_line(err, 200)}), which the float16 conversion needs; export without --dtype fp16 (fp32)"
        ) from None
    finally:
        os.chdir(working_dir)
    described = {info.name for info in model.graph.value_info}
    for info in inferred.graph.value_info:
        element_type = info.type.tensor_type.elem_type
        if info.name and info.name not in described and element_type != onnx.TensorProto.UNDEFINED:
            model.graph.value_info.append(onnx.helper.make_tensor_value_info(info.name, element_type, None))
    return model


def _sample_runs(export_dir: Path, manifest: Manifest,
                 inputs: tuple[np.ndarray, np.ndarray]) -> dict[str, list[dict[str, np.ndarray]]]:
    """The feeds each graph receives on the samples: the encoder, a first step and three cached steps
    (fed the start token, then a few of the inputs' own tokens)."""
    runs: dict[str, list[dict[str, np.ndarray]]] = defaultdict(list)
    runner = GraphRunner(export_dir, manifest, on_run=lambda file, feeds: runs[file].append(dict(feeds)))
    input_ids, attention_mask = inputs
    start = np.full((input_ids.shape[0], 1), manifest.decoder_start_token_id, dtype=np.int64)
    runner.decode(runner.encode(input_ids, attention_mask), attention_mask,
                  np.concatenate([start, input_ids[:, :3]], axis=1))
    return runs


def _largest_values(model: onnx.ModelProto, runs: list[dict[str, np.ndarray]],
                    probe_path: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Largest |value| of every float tensor of the graph (inputs and node outputs) over `runs`, and of
    every softmax input the largest |value| among its live entries (those above -FP16_MAX).

    `model` is left unchanged: the probe is a copy with every node output made a graph output.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    declared = {output.name for output in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name and name not in declared:
                probe.graph.output.append(onnx.ValueInfoProto(name=name))  # type left to onnxruntime to infer
                declared.add(name)
    save_graph(probe, probe_path)
    session = cpu_session(probe_path)
    names = [output.name for output in session.get_outputs() if output.type in _FLOAT_TYPES]
    softmax_inputs = {node.input[0] for node in model.graph.node if node.op_type in _SOFTMAX_OPS}
    largest: dict[str, float] = defaultdict(float)
    live: dict[str, float] = defaultdict(float)
    for feeds in runs:
        values = dict(zip(names, session.run(names, feeds)))
        values.update({name: value for name, value in feeds.items() if np.issubdtype(value.dtype, np.floating)})
        for name, value in values.items():
            value = value.astype(np.float32)
            magnitude = float(np.abs(value).max()) if value.size else 0.0
            largest[name] = max(largest[name], magnitude)
            if name in softmax_inputs:
                # masked entries (the float minimum, or -inf) get weight 0 however they are rounded
                entries = value[value > -FP16_MAX]
                live[name] = max(live[name], float(np.abs(entries).max()) if entries.size else 0.0)
    return largest, live


def _softmax_input_nodes(model: onnx.ModelProto, largest: dict[str, float], live: dict[str, float]) -> set[str]:
    """The float nodes that a softmax input whose live entries exceed FP16_SOFTMAX_INPUT is computed from.

    Walks up from each such input through the nodes writing float tensors (`largest` names them). It
    does not enter tensors beyond the float16 range (the additive masks, which the range rule keeps
    float32 anyway and whose rounding cannot reach a live score), and stops at graph inputs.
    """
    producer = {output: node for node in model.graph.node for output in node.output}
    # A softmax input itself holds the mask's float minimum: it is entered whatever its range.
    starts = {node.input[0] for node in model.graph.node
              if node.op_type in _SOFTMAX_OPS and live.get(node.input[0], 0.0) > FP16_SOFTMAX_INPUT}
    found: set[str] = set()
    pending = list(starts)
    while pending:
        name = pending.pop()
        source = producer.get(name)
        if source is None or source.name in found or name not in largest or \
                (largest[name] >= FP16_MAX and name not in starts):
            continue
        found.add(source.name)
        pending.extend(source.input)
    return found


def _index_math_nodes(model: onnx.ModelProto, float_tensors: set[str]) -> set[str]:
    """Float nodes whose results end up cast to an integer: walks up from each Cast-to-integer through
    the float nodes feeding it (a node writing a float tensor), stopping at non-float nodes."""
    producer = {output: node for node in model.graph.node for output in node.output}
    found: set[str] = set()
    pending = [node for node in model.graph.node if _cast_to(node) in _INTEGER_TYPES]
    while pending:
        node = pending.pop()
        for name in node.input:
            source = producer.get(name)
            if source is None or source.name in found or not any(o in float_tensors for o in source.output):
                continue
            found.add(source.name)
            pending.append(source)
    return found


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
    first_described: dict[str, onnx.ValueInfoProto] = {}  # each name's first value_info, in order
    for value in model.graph.value_info:
        first_described.setdefault(value.name, value)
    value_info = list(first_described.values())
    del model.graph.value_info[:]
    model.graph.value_info.extend(value_info)
    return model


def _without_round_trips(model: onnx.ModelProto) -> onnx.ModelProto:
    """Let float32 nodes pass float32 tensors to each other directly.

    The converter stores a blocked node's output in float16 and casts it back to float32 for the next
    blocked node; for a tensor beyond the float16 range that round trip is the overflow itself. Every
    Cast(to fp32) of such a Cast(to fp16) is bypassed (readers take the original float32 tensor, which
    is only more precise), and float16 casts nobody reads any more are dropped.
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
    nodes = [node for node in graph.node if not (_cast_to(node) is not None and node.output[0] in replaced)]
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
