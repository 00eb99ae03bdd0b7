"""--quantize int8 | int4: weight quantization for CPU, the scheme chosen by the CPU's features.

A `Scheme` says how the MatMul weights are stored and computed; `default_scheme` picks one for the CPU
the export runs on (read from /proc/cpuinfo), and the manifest's `quantization` field records it.
What each choice measured is in bench/README.md ("int8 and int4 schemes", `python -m bench.int8_schemes`).

- int8 ("dynamic"): onnxruntime's `quantize_dynamic`, QOperator graphs: int8 weights, activations
  quantized to uint8 on the fly, run as DynamicQuantizeMatMul / MatMulIntegerToFloat.
- int4 ("matmul_nbits"): weight-only MatMulNBits, 4-bit blocks, computed in int8 (accuracy_level 4)
  where the CPU has kernels for it.

onnxruntime's quantizer is given MatMuls with a constant weight only, never the embedding's Gather:
T5/BART-style checkpoints store the input embedding and the output projection as one tensor, and
quantizing the Gather that way made the output projection dequantize all vocab x d_model weights
every step (measured on t5-small, 2 threads, 64 greedy tokens: 749 ms with Gather quantized, 263 ms
without). The output projection itself reads the shared tensor through a Transpose node, which the
quantizer skips (its weight is not an initializer); `vocab_projection` gives it a transposed copy of
its own, so that the largest MatMul of a decoder step is quantized too.

Once untied, the fp32 embedding table is read by its Gather alone, yet it is the largest tensor of the
encoder and of the decoder (32128 x 512 floats, 66 MB each, on t5-small). `embeddings` stores such
tables as int8 with one scale per row (Gather the int8 rows and their scales, Cast, Mul: a value's
error is at most half a step of 1/127 of its row's largest), which takes 49 MB off each graph and off
the loaded model's memory at no measured cost in time (bench/README.md).

The graphs are quantized split (before the decoders are merged): quantizing the merged graph would
quantize each weight once per branch and store it twice.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from onnx import numpy_helper

from exporter.errors import GraphPassError
from exporter.passes import save_graph

CPUINFO = Path("/proc/cpuinfo")


@dataclass(frozen=True)
class Scheme:
    """How the MatMul weights of every graph are quantized (`record()` is the manifest's entry).

    The fields are the knobs bench/int8_schemes.py measures; `default_scheme` holds the winners.
    """

    method: Literal["dynamic", "matmul_nbits"]  # see the module docstring
    bits: int  # 8 (dynamic); 4 or 8 (matmul_nbits)
    weight_type: Literal["int8", "uint8"] = "int8"  # dynamic: signed or unsigned weights
    per_channel: bool = False  # dynamic: one scale per output column (False: one per tensor)
    reduce_range: bool = False  # dynamic: 7-bit weights
    attention: bool = False  # dynamic: also the activation x activation MatMuls (Q.K^T, softmax.V)
    block_size: int | None = None  # matmul_nbits: weights along K sharing one scale (32, 64, 128)
    accuracy_level: int | None = None  # matmul_nbits: 4 = int8 compute, 0 = the kernel's fp32 default
    vocab_projection: bool = True  # quantize the output projection tied to the embedding (see module)
    embeddings: bool = False  # embedding tables read only by Gathers: int8, one scale per row (see module)
    cpu: str = ""  # the CPU feature level it was chosen for ("avx512-vnni", ...); informational

    def describe(self) -> str:
        """One line for the export's notes, e.g. "dynamic int8, per-tensor int8 weights, output projection
        included (chosen for avx512-vnni)"."""
        if self.method == "dynamic":
            scales = "per-channel" if self.per_channel else "per-tensor"
            extras = (", 7-bit range" if self.reduce_range else "") + (", attention MatMuls" if self.attention else "")
            what = f"dynamic int8, {scales} {self.weight_type} weights{extras}"
        else:
            compute = "int8 compute" if self.accuracy_level == 4 else "fp32 compute"
            what = f"MatMulNBits, {self.bits}-bit weights in blocks of {self.block_size}, {compute}"
        vocab = "output projection included" if self.vocab_projection else "output projection fp32"
        tables = ", embeddings int8 per row" if self.embeddings else ""
        return f"{what}, {vocab}{tables} (chosen for {self.cpu or 'this CPU'})"

    def record(self) -> dict[str, Any]:
        """The manifest's `quantization` entry: only the fields that apply to the method."""
        fields = asdict(self)
        unused = ("block_size", "accuracy_level") if self.method == "dynamic" else \
            ("weight_type", "per_channel", "reduce_range", "attention")
        return {k: v for k, v in fields.items() if k not in unused}


def cpu_level(flags: frozenset[str]) -> str:
    """The CPU's int8 matrix-multiply level, as onnxruntime's MLAS dispatches its quantized GEMMs:
    "amx" (AMX-INT8 tiles), "avx512-vnni", "avx-vnni" (AVX2 with VNNI), "avx512" (AVX512BW, no VNNI),
    "avx2", or "other" (anything else, other architectures, or flags unknown)."""
    if "amx_int8" in flags:
        return "amx"
    if "avx512_vnni" in flags:
        return "avx512-vnni"
    if "avx_vnni" in flags:
        return "avx-vnni"
    if "avx512bw" in flags:
        return "avx512"
    if "avx2" in flags:
        return "avx2"
    return "other"


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """The first CPU's feature flags from /proc/cpuinfo (empty where it is missing: not Linux/x86)."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


# x86 CPUs whose u8 x s8 kernels (vpmaddubsw) add pairs of products in int16 with saturation: full-range
# int8 weights can overflow there (onnxruntime's `session.x64quantprecision` note; SSE4.1, AVX2 and
# AVX-512 without VNNI). 7-bit weights cannot: 2 * 255 * 64 < 32767.
_SATURATING = ("avx2", "avx512")


def default_scheme(quantize: str, level: str) -> Scheme:
    """The measured scheme for `quantize` ("int8" | "int4") on a CPU of `level` (see `cpu_level`).

    Measured on AVX512-VNNI (bench/README.md, "int8 and int4 schemes"), decoder step and encoder at
    1 to 32 rows: per-tensor int8 weights with the output projection included were the fastest int8
    over all sizes; per-channel weights were 18% slower at 1 row and level beyond, uint8 weights,
    quantized attention MatMuls and static QDQ slower, 8-bit MatMulNBits faster at 1 row only (its
    encoder 1.6x slower). The issue-10 table measured per-tensor int8 the fastest on AVX2 as well.
    Where the kernels saturate (`_SATURATING`) the weights are 7-bit: the same speed here, about 1
    point more logits error, the same demo answers. int4: blocks of 128 were the fastest at every
    size, with the same demo answers as blocks of 32 (whose logits are closer).
    """
    if quantize == "int4":
        return Scheme(method="matmul_nbits", bits=4, block_size=128, accuracy_level=4, embeddings=True, cpu=level)
    return Scheme(method="dynamic", bits=8, reduce_range=level in _SATURATING, embeddings=True, cpu=level)


def quantize_graphs(paths: list[Path], scheme: Scheme | None = None) -> Scheme:
    """Quantize each graph in place with `scheme` (None: int8, `default_scheme` for this CPU). Returns it."""
    if scheme is None:
        scheme = default_scheme("int8", cpu_level(cpu_flags()))
    for path in paths:
        if scheme.vocab_projection:
            _untie_output_projection(path)
        if scheme.embeddings:
            _quantize_embedding_tables(path)
        if scheme.method == "dynamic":
            _quantize_dynamic(path, scheme)
        else:
            _quantize_nbits(path, scheme)
    return scheme


def _quantize_dynamic(path: Path, scheme: Scheme) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    staged = path.with_name(path.name + ".quantized")
    # onnx's shape inference cannot type the outputs of fused com.microsoft ops (after --optimize);
    # every float tensor of an fp32 graph is float32, so the quantizer may assume it.
    extra: dict[str, Any] = {"DefaultTensorType": onnx.TensorProto.FLOAT}
    if scheme.attention:
        extra["MatMulConstBOnly"] = False
    quantize_dynamic(path, staged, weight_type=QuantType.QInt8 if scheme.weight_type == "int8" else QuantType.QUInt8,
                     per_channel=scheme.per_channel, reduce_range=scheme.reduce_range, op_types_to_quantize=["MatMul"],
                     extra_options=extra)
    os.replace(staged, path)


def _quantize_nbits(path: Path, scheme: Scheme) -> None:
    """Raises:
        GraphPassError: onnxruntime's MatMulNBits quantizer cannot be imported (onnx-ir missing).
    """
    try:
        with _root_logger_kept():
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as err:
        raise GraphPassError(f"--quantize int4 needs onnxruntime's MatMulNBits quantizer, which cannot be imported "
                             f"({err}); install it with `pip install onnx-ir` (part of s2s[export])") from None

    model = onnx.load(path)
    # Symmetric blocks: no zero points to store or subtract.
    quantizer = MatMulNBitsQuantizer(model, bits=scheme.bits, block_size=scheme.block_size, is_symmetric=True,
                                     accuracy_level=scheme.accuracy_level, op_types_to_quantize=("MatMul",))
    quantizer.process()
    save_graph(quantizer.model.model, path)


@contextmanager
def _root_logger_kept() -> Iterator[None]:
    """onnxruntime's matmul_nbits_quantizer calls logging.basicConfig(level=INFO) when first imported,
    which would make every later INFO record of the process print; undo that."""
    root = logging.getLogger()
    level, handlers = root.level, root.handlers[:]
    try:
        yield
    finally:
        root.setLevel(level)
        root.handlers = handlers


def _untie_output_projection(path: Path) -> None:
    """Give every MatMul that reads a 2-D initializer through a Transpose node its own transposed copy
    of the weights (the tied output projection), so that the quantizer sees a constant weight. The
    Transpose is removed when nothing else reads it. The graph is rewritten only if one was found."""
    model = onnx.load(path)
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    producers = {output: node for node in graph.node for output in node.output}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    graph_outputs = {output.name for output in graph.output}
    copies: dict[str, str] = {}  # weight -> its transposed copy
    for node in graph.node:
        transpose = producers.get(node.input[1]) if node.op_type == "MatMul" else None
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in initializers:
            continue
        weight = initializers[transpose.input[0]]
        perm = [list(a.ints) for a in transpose.attribute if a.name == "perm"]
        if len(weight.dims) != 2 or perm not in ([], [[1, 0]]):
            continue
        if weight.name not in copies:
            copy = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(weight).T),
                                           f"{weight.name}.transposed")
            graph.initializer.append(copy)
            copies[weight.name] = copy.name
        readers[transpose.output[0]] -= 1
        node.input[1] = copies[weight.name]
    if not copies:
        return
    unread = [node for node in graph.node if node.op_type == "Transpose" and node.input[0] in copies
              and readers.get(node.output[0], 0) == 0 and node.output[0] not in graph_outputs]
    for node in unread:
        graph.node.remove(node)
    save_graph(model, path)


MIN_TABLE_ROWS = 256  # smaller tables (T5's relative position buckets) stay fp32: nothing to gain


def _quantize_embedding_tables(path: Path) -> None:
    """Store every 2-D float32 initializer that only Gathers (axis 0) read, with at least MIN_TABLE_ROWS
    rows, as int8 with one float32 scale per row: each Gather becomes Gather(int8 rows) -> Cast ->
    Mul(Gather(scales)). The graph is rewritten only if such a table was found."""
    model = onnx.load(path)
    graph = model.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    graph_outputs = {output.name for output in graph.output}
    tables = [init for init in graph.initializer
              if init.data_type == onnx.TensorProto.FLOAT and len(init.dims) == 2 and init.dims[0] >= MIN_TABLE_ROWS
              and init.name not in graph_outputs and readers.get(init.name)
              and all(_gathers_rows(node, init.name) for node in readers[init.name])]
    if not tables:
        return
    for table in tables:
        weights = numpy_helper.to_array(table).astype(np.float32)
        scales = np.abs(weights).max(axis=1, keepdims=True) / 127.0
        scales[scales == 0] = 1.0
        rows = np.clip(np.rint(weights / scales), -127, 127).astype(np.int8)
        graph.initializer.remove(table)
        graph.initializer.extend([numpy_helper.from_array(rows, f"{table.name}.int8"),
                                  numpy_helper.from_array(scales.astype(np.float32), f"{table.name}.row_scale")])
        for gather in readers[table.name]:
            _dequantizing_gather(graph, gather, table.name)
    save_graph(model, path)


def _gathers_rows(node: onnx.NodeProto, table: str) -> bool:
    """`node` is a Gather of whole rows of `table` (its data input, axis 0)."""
    axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
    return node.op_type == "Gather" and node.input[0] == table and table not in node.input[1:] and axis == 0


def _dequantizing_gather(graph: onnx.GraphProto, gather: onnx.NodeProto, table: str) -> None:
    """Replace `gather` (of `table`'s rows) with Gather int8 rows -> Cast -> Mul by the rows' scales,
    writing its output name, in its place in the node order."""
    indices, output = gather.input[1], gather.output[0]
    stem = f"{gather.name or output}.dequantized"
    nodes = [
        onnx.helper.make_node("Gather", [f"{table}.int8", indices], [f"{stem}.rows"], name=f"{stem}.gather", axis=0),
        onnx.helper.make_node("Cast", [f"{stem}.rows"], [f"{stem}.float"], name=f"{stem}.cast",
                              to=onnx.TensorProto.FLOAT),
        onnx.helper.make_node("Gather", [f"{table}.row_scale", indices], [f"{stem}.scale"], name=f"{stem}.scales",
                              axis=0),
        onnx.helper.make_node("Mul", [f"{stem}.float", f"{stem}.scale"], [output], name=f"{stem}.mul"),
    ]
    position = list(graph.node).index(gather)
    graph.node.remove(gather)
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)
