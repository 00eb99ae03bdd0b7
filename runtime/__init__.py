"""s2s runtime: run exported encoder-decoder ONNX models with cached-KV greedy and beam search.

Imports onnxruntime and numpy (and tokenizers for text) only, never torch.

    import runtime
    model = runtime.load("out/t5-small", provider="auto")
    model.generate_text(["translate English to German: Hello"], num_beams=4)

`import runtime` (and `import runtime.manifest`, `import runtime.errors`) loads the standard library
only: `load` and `Model` are imported on first use, so the exporter, the training code and a CLI's
`--help` pay for numpy and onnxruntime only when they run a model.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from runtime.errors import (
    ExportDirError,
    InvalidInputError,
    InvalidOptionError,
    ManifestVersionError,
    ProviderUnavailableError,
    S2SError,
    UnsupportedModelError,
)

if TYPE_CHECKING:
    from runtime.model import Model, load

_LAZY = {"load": "runtime.model", "Model": "runtime.model"}  # public name -> the module defining it

__all__ = [
    "load",
    "Model",
    "S2SError",
    "ExportDirError",
    "ManifestVersionError",
    "ProviderUnavailableError",
    "UnsupportedModelError",
    "InvalidOptionError",
    "InvalidInputError",
]


def __getattr__(name: str) -> Any:
    """`runtime.load`, `from runtime import Model`: import the defining module on first use."""
    if name not in _LAZY:
        raise AttributeError(f"module 'runtime' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
