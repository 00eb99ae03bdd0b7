"""The runtime stays light: importing it, loading a model and generating text never imports torch."""

from __future__ import annotations

import subprocess
import sys

from tests.fixtures.hf_models import SAMPLE_TEXTS

HEAVY = ("torch", "transformers", "optimum", "onnx")


def _modules_after(code: str) -> set[str]:
    probe = "import sys\n" + code + "\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def test_import_runtime_is_torch_free():
    loaded = _modules_after("import runtime")
    assert not [m for m in HEAVY if m in loaded]


def test_load_and_generate_text_is_torch_free(exported_dir):
    export = exported_dir("t5")  # has tokenizer.json, so no transformers fallback
    loaded = _modules_after(
        f"import runtime\nm = runtime.load({str(export)!r}, provider='cpu')\n"
        f"print(m.generate_text({SAMPLE_TEXTS[:2]!r}, num_beams=2, max_new_tokens=4), file=sys.stderr)"
    )
    assert "onnxruntime" in loaded
    assert not [m for m in HEAVY if m in loaded]
