"""Static checks over the source files: imports point down the layers, and runtime/ functions stay short.

The layers, bottom first: runtime/ (the contract and the torch-free runtime), then models/ (PyTorch
models, which use the contract), exporter/ (uses both), and on top serve/, bench/ and demo/. A
package may import the ones below it, never one above; lazy imports inside functions count too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {  # package -> the project's packages it must never import
    "runtime": {"exporter", "models", "serve", "bench", "demo"},
    "models": {"exporter", "serve", "bench", "demo"},
    "exporter": {"serve", "bench", "demo"},
    "serve": {"exporter", "models", "bench", "demo"},
}
MAX_FUNCTION_LINES = 60  # runtime/: a longer function is split into named steps


def _sources(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _imported_packages(path: Path) -> dict[str, int]:
    """Top-level package of every absolute import in the file -> the first line importing it."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            found.setdefault(name.split(".")[0], node.lineno)
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_down(package):
    assert _sources(package), f"no source files under {package}/"
    upward = [f"{path.relative_to(ROOT)}:{line} imports {imported}"
              for path in _sources(package)
              for imported, line in _imported_packages(path).items() if imported in FORBIDDEN[package]]
    assert not upward, upward


def test_the_checker_sees_lazy_imports(tmp_path):
    source = tmp_path / "lazy.py"
    source.write_text("import os\n\ndef f():\n    from exporter.api import export\n    import models.train\n")
    assert _imported_packages(source) == {"os": 1, "exporter": 4, "models": 5}


def test_runtime_functions_are_short():
    long = []
    for path in _sources("runtime"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long
