"""--quantize int8: dynamic int8 quantization for CPU (onnxruntime.quantization.quantize_dynamic).

Weights of MatMuls are stored as int8 with one scale per tensor (QInt8, per-tensor); activations
are quantized on the fly. Measured in DESIGN.md on a t5-small-shaped model: ~3x faster than fp32 on
CPU with logits within ~1.5% of the largest; per-channel scales were more accurate but slower, QUInt8
slower. Only MatMul weights are quantized: T5/BART-style checkpoints store the input embedding and the
output projection as one tensor, and quantizing the embedding's Gather made the output projection
dequantize all vocab x d_model weights every step (measured on t5-small, 2 threads, 64 greedy tokens:
749 ms with Gather quantized, 263 ms without; fp32 351 ms). The graphs are quantized split (before the decoders are merged): quantizing the merged graph
would quantize each weight once per branch and store it twice.
"""

from __future__ import annotations

import os
from pathlib import Path


def quantize_graphs(paths: list[Path]) -> None:
    """Quantize each graph in place."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    for path in paths:
        staged = path.with_name(path.name + ".int8")
        # onnx's shape inference cannot type the outputs of fused com.microsoft ops (after --optimize);
        # every float tensor of an fp32 graph is float32, so the quantizer may assume it.
        quantize_dynamic(path, staged, weight_type=QuantType.QInt8, per_channel=False, op_types_to_quantize=["MatMul"],
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        os.replace(staged, path)
