"""bench/serve_load.py runs end to end against the real s2s-serve on the tiny-t5 shape. No timing is
asserted: the numbers are for reading; what is checked is that every request was answered and counted,
and that the word-level tokenizer the shapes get maps its words to the ids they name."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from bench.serve_load import _word_tokenizer, main
from runtime.manifest import Manifest

pytestmark = pytest.mark.slow  # starts s2s-serve


def test_serve_load_measures_both_comparisons(tmp_path):
    out_dir = tmp_path / "out"
    args = ["--model", "tiny-t5", "--threads", "1", "--requests", "3", "--concurrency", "1,3", "--new-tokens", "3",
            "--rounds", "1", "--out", str(out_dir), "--cache-dir", str(tmp_path / "cache")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    results = json.loads((out_dir / "serve_load.json").read_text(encoding="utf-8"))
    assert [row["concurrency"] for row in results["sweep"]] == [1, 3]
    assert [row["requests"] for row in results["sweep"]] == [8, 8]
    assert results["ratio"] > 0 and len(results["comparison"]) == 1
    assert "concurrent finish" in result.output and (out_dir / "serve_load.png").stat().st_size > 0

    manifest = Manifest.read(next((tmp_path / "cache" / "artefacts" / "serve").iterdir()))
    tokenizer = _word_tokenizer(manifest)
    assert tokenizer.encode("w5 w17").ids == [5, 17, manifest.eos_token_ids[0]]
