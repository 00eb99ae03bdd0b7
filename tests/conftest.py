"""Session-wide fixtures: tiny Hugging Face checkpoints and their exports, each built once per session.

Every fixture here is a factory keyed by variant (one of tests.fixtures.hf_models.VARIANTS):

    def test_something(hf_model_dir, hf_torch_model, hf_tokenizer, exported_dir):
        checkpoint = hf_model_dir("bart")                  # Path: config, weights, tokenizer files
        model = hf_torch_model("bart")                     # transformers model, eval mode
        tokenizer = hf_tokenizer("bart")                   # AutoTokenizer (fast where tokenizer.json exists)
        onnx_dir = exported_dir("bart", quantize="int8")   # exporter.export(..., validate=False)

What they return is shared by every test of the session: do not modify it (copy a model before
changing its generation_config or weights).

Tiers: a test that uses `exported_dir` or `ray_address` (directly or through another fixture) is
marked `slow` here; one that exports, trains or starts a server by itself carries the mark in its
module. `make test-fast` runs `-m "not slow"`, `make test` runs everything.

Nothing here imports torch or transformers at collection time, so tests that check the runtime
imports neither still can.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.hf_models import build_hf_model


def pytest_configure(config: pytest.Config) -> None:
    # One torch thread (set before anything imports torch; subprocesses inherit it). The test models
    # are tiny, so a second thread only adds hand-off cost, and on a busy 2-core machine it made
    # transformers' generate 5-20x slower (the fixture tests: 33 s with two threads, 7 s with one).
    # onnxruntime does not read this variable. Set OMP_NUM_THREADS yourself to override.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # MarianTokenizer warns on every load that sacremoses (Moses punctuation normalisation) is not
    # installed; the fixtures' plain ASCII text needs none, and nothing else in s2s uses it.
    config.addinivalue_line("filterwarnings", "ignore:Recommended. pip install sacremoses:UserWarning")


# Fixtures that export a model or start Ray: whatever uses them is in the slow tier.
SLOW_FIXTURES = ("exported_dir", "ray_address")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(name in getattr(item, "fixturenames", ()) for name in SLOW_FIXTURES):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def hf_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`hf_model_dir(variant) -> Path`: the variant's checkpoint directory, built on first use."""
    built: dict[str, Path] = {}

    def get(variant: str) -> Path:
        if variant not in built:
            built[variant] = build_hf_model(variant, tmp_path_factory.mktemp(f"hf-{variant}"))
        return built[variant]

    return get


@pytest.fixture(scope="session")
def hf_torch_model(hf_model_dir: Callable[[str], Path]) -> Callable[[str], Any]:
    """`hf_torch_model(variant)`: the checkpoint loaded with AutoModelForSeq2SeqLM, in eval mode."""
    loaded: dict[str, Any] = {}

    def get(variant: str):
        if variant not in loaded:
            from transformers import AutoModelForSeq2SeqLM

            loaded[variant] = AutoModelForSeq2SeqLM.from_pretrained(hf_model_dir(variant)).eval()
        return loaded[variant]

    return get


@pytest.fixture(scope="session")
def hf_tokenizer(hf_model_dir: Callable[[str], Path]) -> Callable[[str], Any]:
    """`hf_tokenizer(variant)`: AutoTokenizer of the checkpoint (slow MarianTokenizer for marian)."""
    loaded: dict[str, Any] = {}

    def get(variant: str):
        if variant not in loaded:
            from transformers import AutoTokenizer

            loaded[variant] = AutoTokenizer.from_pretrained(hf_model_dir(variant))
        return loaded[variant]

    return get


@pytest.fixture(scope="session")
def exported_dir(hf_model_dir: Callable[[str], Path],
                 tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`exported_dir(variant, **export_kwargs) -> Path`: `exporter.export(checkpoint, out,
    validate=False, **export_kwargs)`, once per variant and kwargs.

    validate=False: tests compare against transformers themselves; the exporter's own validation
    is tested where it is the subject.
    """
    exported: dict[tuple[str, str], Path] = {}

    def get(variant: str, **export_kwargs: Any) -> Path:
        key = (variant, repr(sorted(export_kwargs.items())))  # kwargs values need not be hashable
        if key not in exported:
            from exporter import export

            out_dir = tmp_path_factory.mktemp(f"export-{variant}") / "export"
            export(hf_model_dir(variant), out_dir, validate=False, **export_kwargs)
            exported[key] = out_dir
        return exported[key]

    return get


@pytest.fixture(scope="session")
def ray_address() -> Iterator[str]:
    """A local Ray instance for the whole session, started on first use and shut down at the end: 2 CPUs,
    no dashboard, no usage statistics (nothing reaches the network). This process is its driver; the
    value is its address, for a subprocess to join (`s2s-serve --ray --ray-address ADDRESS`)."""
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # inherited by Ray's processes and by subprocesses
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
