"""s2s exporter: Hugging Face and models/ checkpoints to a validated ONNX export directory.

    from exporter import export
    report = export("path/to/hf_checkpoint", "out/dir", quantize="int8")

Uses the runtime's manifest module to write the contract (s2s.json) and the runtime itself to
validate what it wrote; the runtime never imports this package.
"""

from exporter.api import ExportReport, export

__all__ = ["export", "ExportReport"]
