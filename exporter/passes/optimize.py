"""--optimize: onnxruntime's transformer graph fusions, the same for every architecture.

The fusions are pattern-based: onnxruntime's "bart" family fuses layer norms (LayerNormalization,
SkipLayerNormalization, and T5's RMS norm into (Skip)SimplifiedLayerNormalization) and bias+GELU
wherever the patterns occur, and leaves a graph alone where they do not, so every encoder-decoder can
take it. Two fusions are left off on purpose:
- T5's own family ("t5") emits a RelativePositionBias contrib op that the CPU provider of onnxruntime
  1.31 cannot load (DESIGN.md), so an export must not depend on it;
- attention fusion is off: its patterns target BERT-style graphs, and a mis-fused cross-attention with
  a cache is the kind of error only a long generation would reveal.
onnxruntime's own graph optimizations are not baked in (opt_level 0): sessions apply them at load time
for the provider they actually run on. Measured in DESIGN.md: 5-7% per decoder step on CPU.
"""

from __future__ import annotations

from pathlib import Path

import onnx

from exporter.passes import save_graph

FUSION_FAMILY = "bart"


def optimize_graphs(paths: list[Path]) -> dict[str, int]:
    """Fuse each graph in place. Returns how many of each fused operator were created, over all graphs."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions(FUSION_FAMILY)
    options.enable_attention = False
    fused: dict[str, int] = {}
    for path in paths:
        optimized = optimize_model(str(path), model_type=FUSION_FAMILY, num_heads=0, hidden_size=0,
                                   optimization_options=options, opt_level=0)
        for op, count in optimized.get_fused_operator_statistics().items():
            if count:
                fused[op] = fused.get(op, 0) + count
        model: onnx.ModelProto = optimized.model
        # The fused ops live in the com.microsoft domain; onnxruntime runs them without the opset import,
        # but onnx's checker (which merging the decoders runs) requires it.
        domains = {node.domain for node in model.graph.node} - {opset.domain for opset in model.opset_import}
        model.opset_import.extend(onnx.helper.make_opsetid(domain, 1) for domain in sorted(domains - {""}))
        save_graph(model, path)
    return fused
