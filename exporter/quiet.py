"""Keep the libraries' warnings and log lines off the user's terminal while exporting.

Tracing prints TracerWarnings, transformers and optimum log advice meant for their own CLIs, and
onnxruntime's quantizer logs through the root logger. None of it is actionable for an s2s user; the
messages are kept (deduplicated) in the export report instead of being lost.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import onnxruntime as ort

# "" is the root logger: onnxruntime.quantization logs there directly.
_LIBRARY_LOGGERS = ("", "transformers", "optimum", "onnxruntime", "onnx", "torch", "accelerate")
_ORT_WARNING, _ORT_ERROR = 2, 3  # onnxruntime's default severity, and "errors only"


class _Collect(logging.Handler):
    def __init__(self, messages: list[str]):
        super().__init__(logging.WARNING)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"{record.name or 'root'}: {record.getMessage().strip()}")


@contextmanager
def library_output_captured() -> Iterator[list[str]]:
    """Collect library warnings and log records (WARNING and up) into the yielded list."""
    # transformers and optimum attach their own stream handler on first use; make that happen now, so
    # the swap below replaces it rather than being bypassed by it.
    import optimum.utils.logging
    import transformers.utils.logging

    transformers.utils.logging.get_logger()
    optimum.utils.logging.get_logger()
    messages: list[str] = []
    handler = _Collect(messages)
    saved = []
    for name in _LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate))
        logger.handlers = [handler]
        logger.propagate = False
    ort.set_default_logger_severity(_ORT_ERROR)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")  # each distinct warning once, not once per traced layer
            yield messages
        messages.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    finally:
        ort.set_default_logger_severity(_ORT_WARNING)
        for logger, handlers, propagate in saved:
            logger.handlers = handlers
            logger.propagate = propagate
    unique = list(dict.fromkeys(messages))
    messages[:] = unique


@contextmanager
def sys_path_restored() -> Iterator[None]:
    """Undo what libraries add to sys.path while the block runs.

    Importing onnxruntime's Python tools (quantization, the transformers optimizer, symbolic shape
    inference) appends onnxruntime/transformers and onnxruntime/tools to sys.path; the `models/`
    folder there would then shadow this project's `models` package for any later first import.
    Those tools import their siblings through sys.path (`from fusion_options import ...`), so a tool
    module first imported in a later block needs the folders back: they are re-added for the block
    when an earlier one imported their package.
    """
    saved = list(sys.path)
    for package in ("onnxruntime.transformers", "onnxruntime.tools"):
        module = sys.modules.get(package)
        folder = os.path.dirname(module.__file__) if module is not None and module.__file__ else None
        if folder is not None and folder not in sys.path:
            sys.path.append(folder)
    try:
        yield
    finally:
        sys.path[:] = saved
