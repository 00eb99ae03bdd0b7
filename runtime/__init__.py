"""s2s runtime: run exported encoder-decoder ONNX models with cached-KV greedy and beam search.

Imports onnxruntime and numpy (and tokenizers for text) only, never torch.

    import runtime
    model = runtime.load("out/t5-small", provider="auto")
    model.generate_text(["translate English to German: Hello"], num_beams=4)
"""

from runtime.errors import (
    ExportDirError,
    InvalidInputError,
    InvalidOptionError,
    ManifestVersionError,
    ProviderUnavailableError,
    S2SError,
)
from runtime.model import Model, load

__all__ = [
    "load",
    "Model",
    "S2SError",
    "ExportDirError",
    "ManifestVersionError",
    "ProviderUnavailableError",
    "InvalidOptionError",
    "InvalidInputError",
]
