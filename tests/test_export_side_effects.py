"""Exporting leaves the process as it found it: onnxruntime's tools must not stay on sys.path, where
their `models/` folder would shadow this project's `models` package."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # exports in a subprocess


def test_int8_export_leaves_sys_path_alone(hf_model_dir, tmp_path):
    code = (
        "import sys, exporter\n"
        "before = list(sys.path)\n"
        f"exporter.export({str(hf_model_dir('t5'))!r}, {str(tmp_path / 'out')!r}, quantize='int8', validate=False)\n"
        "assert sys.path == before, [p for p in sys.path if p not in before]\n"
        "import models\n"
        "assert models.__file__ and 'onnxruntime' not in models.__file__, models.__file__\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
