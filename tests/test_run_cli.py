"""s2s-run: outputs equal the API's, and every bad input is one clear line with a non-zero exit."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

import runtime
from runtime.cli import main
from tests.cli_asserts import assert_one_line_error
from tests.fixtures.hf_models import SAMPLE_TEXTS


def _run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def test_texts_as_arguments_match_generate_text(exported_dir):
    export = exported_dir("t5")
    expected = runtime.load(export, provider="cpu").generate_text(SAMPLE_TEXTS[:2], num_beams=2, max_new_tokens=8)
    result = _run(export, *SAMPLE_TEXTS[:2], "--num-beams", 2, "--max-new-tokens", 8, "--provider", "cpu")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == expected


def test_json_from_stdin_keeps_input_order_across_batches(exported_dir):
    export = exported_dir("bart")
    model = runtime.load(export, provider="cpu")
    texts = SAMPLE_TEXTS[:5]
    result = _run(export, "--json", "--batch-size", 2, "--num-beams", 3, "--num-return-sequences", 2,
                  "--max-new-tokens", 6, input="\n".join(texts) + "\n")
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["input"] for r in records] == texts
    for record in records:
        expected = model.generate_text([record["input"]], num_beams=3, num_return_sequences=2, max_new_tokens=6)
        assert record["outputs"] == expected
        assert len(record["token_ids"]) == 2 and len(record["scores"]) == 2
        assert record["scores"][0] >= record["scores"][1]


def test_output_file_written_whole(exported_dir, tmp_path):
    target = tmp_path / "out.txt"
    inputs = tmp_path / "in.txt"
    inputs.write_text("\n".join(SAMPLE_TEXTS[:3]) + "\n", encoding="utf-8")
    result = _run(exported_dir("t5"), "-i", inputs, "-o", target, "--max-new-tokens", 5)
    assert result.exit_code == 0, result.output
    assert len(target.read_text(encoding="utf-8").splitlines()) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]  # no temp file left


@pytest.mark.parametrize("args, fragment", [
    (["--num-beams", "0"], "num_beams"),
    (["--num-beams", "2", "--num-return-sequences", "3"], "num_return_sequences"),
    (["--max-new-tokens", "-1"], "max_new_tokens"),
    (["--min-length", "-2"], "min_length"),
    (["--bad-words-ids", "a,b"], "bad-words-ids"),
])
def test_invalid_options(exported_dir, args, fragment):
    assert_one_line_error(_run(exported_dir("t5"), "hello", *args), fragment)


def test_missing_directory(tmp_path):
    assert_one_line_error(_run(tmp_path / "nope", "hello"), "does not exist")


def test_directory_without_manifest(tmp_path):
    assert_one_line_error(_run(tmp_path, "hello"), "s2s.json")


def test_corrupt_graph(exported_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exported_dir("t5"), broken)
    decoder = broken / runtime.load(exported_dir("t5"), provider="cpu").manifest.decoder_file
    decoder.write_bytes(decoder.read_bytes()[:1000])
    assert_one_line_error(_run(broken, "hello"), "cannot load graph")


def test_missing_graph(exported_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exported_dir("t5"), broken)
    (broken / runtime.load(exported_dir("t5"), provider="cpu").manifest.encoder_file).unlink()
    assert_one_line_error(_run(broken, "hello"), "missing")


def test_empty_input_line(exported_dir):
    assert_one_line_error(_run(exported_dir("t5"), input="hello\n\nworld\n"), "line 2")


def test_empty_text_argument(exported_dir):
    assert_one_line_error(_run(exported_dir("t5"), "   "), "empty")


def test_too_long_input_fails_unless_truncated(exported_dir):
    export = exported_dir("bart")
    limit = runtime.load(export, provider="cpu").manifest.max_source_positions
    assert limit is not None
    long_text = " ".join(["word"] * (limit * 2))
    assert_one_line_error(_run(export, long_text), "maximum")
    result = _run(export, long_text, "--truncate", "--max-new-tokens", 3)
    assert result.exit_code == 0, result.output
    assert "truncated" in result.output


def test_cuda_requested_without_cuda_is_a_clear_error(exported_dir):
    from runtime.sessions import resolve_provider

    try:
        resolve_provider("cuda")
    except runtime.ProviderUnavailableError:
        pass
    else:
        pytest.skip("a working CUDA provider is present here")
    assert_one_line_error(_run(exported_dir("t5"), "hello", "--provider", "cuda"), "CUDA", "--provider cpu")


def test_help_teaches():
    result = _run("--help")
    assert result.exit_code == 0
    for option in ("--num-beams", "--provider", "--batch-size", "--json", "Examples"):
        assert option in result.output


def test_output_that_is_a_directory_fails_before_work(exported_dir, tmp_path):
    assert_one_line_error(_run(exported_dir("t5"), "hello", "-o", tmp_path), "is a directory")
    assert list(tmp_path.iterdir()) == []


def test_too_long_generation_fails_before_any_output(exported_dir):
    result = _run(exported_dir("bart"), "hello", "--max-new-tokens", 5000)
    assert_one_line_error(result, "positions")
    assert result.stdout.strip() == "" or "Error" in result.stdout
