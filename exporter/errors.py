"""Export failures a user can fix (the runtime's errors cover the rest: UnsupportedModelError,
InvalidOptionError). The CLI prints each as one line and exits 1."""

from runtime.errors import S2SError


class SourceModelError(S2SError):
    """The model to export is missing, unreadable or corrupt (no config.json, truncated weights, ...)."""


class OutputDirError(S2SError):
    """The output directory exists and is not empty (without --force), or cannot be written."""


class GraphPassError(S2SError):
    """A graph pass cannot process this model's graphs (--dtype fp16: a tensor onnxruntime cannot type)."""


class ValidationError(S2SError):
    """An exported graph disagrees with the PyTorch model beyond the tolerance."""
