"""The runtime stays light: importing it, loading a model and generating text never imports torch;
the contract modules load the standard library alone, and models/ (training) loads no onnxruntime."""

from __future__ import annotations

import subprocess
import sys

from tests.fixtures.hf_models import SAMPLE_TEXTS

HEAVY = ("torch", "transformers", "optimum", "onnx")


def _modules_after(code: str) -> set[str]:
    probe = "import sys\n" + code + "\nprint('\\n'.join(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
    return set(out.split())


def _added_packages(code: str) -> set[str]:
    """Top-level packages that `code` imports beyond what the interpreter loads at startup."""
    startup = _modules_after("")
    return {name.split(".")[0] for name in _modules_after(code) - startup}


def test_import_runtime_is_torch_free():
    loaded = _modules_after("import runtime")
    assert not [m for m in HEAVY if m in loaded]


def test_manifest_and_errors_load_only_the_standard_library():
    for code in ("import runtime.manifest", "import runtime.errors", "import runtime"):
        beyond = _added_packages(code) - set(sys.stdlib_module_names) - {"runtime"}
        assert not beyond, (code, sorted(beyond))


def test_public_names_load_on_first_use():
    loaded = _modules_after(
        "import runtime\n"
        "assert 'runtime.model' not in sys.modules\n"
        "from runtime import Model, UnsupportedModelError\n"
        "import runtime.model, runtime.errors\n"
        "assert runtime.load is runtime.model.load and Model is runtime.model.Model\n"
        "assert UnsupportedModelError is runtime.errors.UnsupportedModelError\n"
        "assert set(runtime.__all__) <= set(dir(runtime))"
    )
    assert "onnxruntime" in loaded


def test_import_models_loads_no_onnxruntime():
    loaded = _modules_after("import models, models.checkpoint, models.generate, models.train")
    assert "torch" in loaded  # the probe did import the training code
    assert "onnxruntime" not in loaded and "exporter" not in loaded


def test_load_and_generate_text_is_torch_free(exported_dir):
    export = exported_dir("t5")  # has tokenizer.json, so no transformers fallback
    loaded = _modules_after(
        f"import runtime\nm = runtime.load({str(export)!r}, provider='cpu')\n"
        f"print(m.generate_text({SAMPLE_TEXTS[:2]!r}, num_beams=2, max_new_tokens=4), file=sys.stderr)"
    )
    assert "onnxruntime" in loaded
    assert not [m for m in HEAVY if m in loaded]
