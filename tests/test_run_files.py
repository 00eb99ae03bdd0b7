"""s2s-run on files: input order across windows and batches, token-budget batches, resumable -o output
(a real run killed with SIGKILL, then --resume), empty and too-long lines, JSON lines, progress."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

import runtime
from runtime.cli import main
from tests.cli_asserts import assert_one_line_error
from tests.fixtures.hf_models import SAMPLE_TEXTS

REPO = Path(__file__).resolve().parent.parent
LINES = [f"{SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)]} {' '.join(['again'] * (i % 5))}".strip() for i in range(30)]
FAST = ["--max-new-tokens", 6, "--provider", "cpu"]
SMALL_WINDOWS = ["--window", 4, "--batch-size", 3]


def _run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def t5_dir(exported_dir):
    return exported_dir("t5")


@pytest.fixture(scope="module")
def expected(t5_dir):
    """What generate_text gives for LINES, in one call: the oracle of every file run here."""
    return runtime.load(t5_dir, provider="cpu").generate_text(LINES, max_new_tokens=6)


def test_order_kept_across_windows_and_batches(t5_dir, expected, tmp_path):
    result = _run(t5_dir, "-i", _write(tmp_path / "in.txt", LINES), *SMALL_WINDOWS, *FAST)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == expected


def test_max_batch_tokens_gives_the_default_outputs(t5_dir, tmp_path):
    inputs = _write(tmp_path / "in.txt", LINES)
    default = _run(t5_dir, "-i", inputs, "--json", *FAST)
    budget = _run(t5_dir, "-i", inputs, "--json", "--max-batch-tokens", 25, *SMALL_WINDOWS, *FAST)
    assert default.exit_code == 0 and budget.exit_code == 0, default.output + budget.output
    # greedy: no scores, so the records (token ids included, which carry no batch padding) are equal
    assert budget.stdout == default.stdout
    assert [json.loads(line)["input"] for line in default.stdout.splitlines()] == LINES


def test_output_file_appears_only_at_the_end(t5_dir, expected, tmp_path):
    target = tmp_path / "out.txt"
    result = _run(t5_dir, "-i", _write(tmp_path / "in.txt", LINES), "-o", target, *SMALL_WINDOWS, *FAST)
    assert result.exit_code == 0, result.output
    assert target.read_text(encoding="utf-8").splitlines() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt"]


def _complete_lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def test_killed_run_then_resume_equals_an_uninterrupted_run(t5_dir, tmp_path):
    inputs = _write(tmp_path / "in.txt", LINES)
    reference = tmp_path / "reference.jsonl"
    result = _run(t5_dir, "-i", inputs, "-o", reference, "--json", *FAST)
    assert result.exit_code == 0, result.output

    # A real s2s-run reading stdin, which this test keeps open: the run cannot finish before the kill.
    target = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    command = [sys.executable, "-c", "from runtime.cli import main; main()", str(t5_dir), "-o", str(target),
               "--json", *map(str, SMALL_WINDOWS), *map(str, FAST)]
    process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        process.stdin.write("".join(line + "\n" for line in LINES[:18]).encode())
        process.stdin.flush()
        deadline = time.monotonic() + 120
        while _complete_lines(partial) < 4:  # the first window is written
            assert process.poll() is None, process.stderr.read().decode()
            assert time.monotonic() < deadline, "no result line within 120 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdin.close()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not target.exists()
    written = partial.read_bytes()
    done = written.count(b"\n")
    assert 4 <= done <= 18
    for line in written.splitlines()[:done]:  # every complete line is a whole record
        assert json.loads(line)["input"] in LINES

    result = _run(t5_dir, "-i", inputs, "-o", target, "--json", "--resume", *SMALL_WINDOWS, *FAST)
    assert result.exit_code == 0, result.output
    assert f"{done} input(s) done" in result.output
    assert target.read_bytes() == reference.read_bytes()
    assert not partial.exists()


def test_resume_drops_a_torn_last_line(t5_dir, expected, tmp_path):
    inputs = _write(tmp_path / "in.txt", LINES)
    target = tmp_path / "out.txt"
    partial = tmp_path / "out.txt.partial"
    records = [json.dumps({"input": line, "outputs": [output]}) + "\n"
               for line, output in zip(LINES, expected, strict=True)]
    partial.write_text("".join(records[:5]) + records[5][:17], encoding="utf-8")  # killed mid-write
    result = _run(t5_dir, "-i", inputs, "-o", target, "--resume", *SMALL_WINDOWS, *FAST)
    assert result.exit_code == 0, result.output
    assert "5 input(s) done" in result.output
    assert target.read_text(encoding="utf-8").splitlines() == expected


def test_resume_against_another_file_refuses_and_keeps_the_partial(t5_dir, tmp_path):
    target = tmp_path / "out.txt"
    partial = tmp_path / "out.txt.partial"
    partial.write_text("".join(json.dumps({"input": line, "outputs": ["x"]}) + "\n" for line in LINES[:3]),
                       encoding="utf-8")
    before = partial.read_bytes()
    other = _write(tmp_path / "other.txt", LINES[:2] + ["Something else entirely."] + LINES[3:])
    assert_one_line_error(_run(t5_dir, "-i", other, "-o", target, "--resume", *FAST), "other inputs", "line 3")
    shorter = _write(tmp_path / "short.txt", LINES[:2])
    assert_one_line_error(_run(t5_dir, "-i", shorter, "-o", target, "--resume", *FAST), "more results")
    assert partial.read_bytes() == before
    assert not target.exists()


def test_an_existing_partial_without_resume_is_an_error(t5_dir, tmp_path):
    partial = tmp_path / "out.txt.partial"
    partial.write_text("", encoding="utf-8")
    result = _run(t5_dir, "-i", _write(tmp_path / "in.txt", LINES[:2]), "-o", tmp_path / "out.txt", *FAST)
    assert_one_line_error(result, "out.txt.partial", "--resume", "delete it")


def test_an_empty_line_in_a_file_fails_before_any_work(t5_dir, tmp_path):
    inputs = _write(tmp_path / "in.txt", LINES[:3] + [" "] + LINES[3:6] + ["", ""])  # trailing blanks are fine
    result = _run(t5_dir, "-i", inputs, "-o", tmp_path / "out.txt", *FAST)
    assert_one_line_error(result, "line 4 of", "--skip-empty")
    assert "CPU" not in result.output  # the model was never loaded
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]


def test_skip_empty_keeps_output_lines_aligned(t5_dir, expected, tmp_path):
    inputs = _write(tmp_path / "in.txt", LINES[:3] + [""] + LINES[3:6])
    result = _run(t5_dir, "-i", inputs, "--skip-empty", *FAST)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == expected[:3] + [""] + expected[3:6]


def test_an_empty_line_on_stdin_fails_at_that_line_and_resume_continues_after_the_fix(t5_dir, tmp_path):
    target = tmp_path / "out.txt"
    lines = LINES[:8] + [""] + LINES[9:12]
    result = _run(t5_dir, "-o", target, *SMALL_WINDOWS, *FAST, input="".join(line + "\n" for line in lines))
    assert_one_line_error(result, "line 9 of stdin is empty")
    assert _complete_lines(tmp_path / "out.txt.partial") == 8  # the windows before it are kept
    fixed = _write(tmp_path / "fixed.txt", LINES[:12])
    result = _run(t5_dir, "-i", fixed, "-o", target, "--resume", *SMALL_WINDOWS, *FAST)
    assert result.exit_code == 0, result.output
    assert target.read_text(encoding="utf-8").splitlines() == \
        runtime.load(t5_dir, provider="cpu").generate_text(LINES[:12], max_new_tokens=6)


def test_a_too_long_line_names_its_line_number(exported_dir, tmp_path):
    export = exported_dir("bart")
    limit = runtime.load(export, provider="cpu").manifest.max_source_positions
    inputs = _write(tmp_path / "in.txt", LINES[:6] + [" ".join(["word"] * (limit * 2))] + LINES[:2])
    assert_one_line_error(_run(export, "-i", inputs, *SMALL_WINDOWS, *FAST), "line 7 of", "maximum")
    result = _run(export, "-i", inputs, "--truncate", *SMALL_WINDOWS, *FAST)
    assert result.exit_code == 0, result.output
    assert "line 7 of" in result.stderr and "truncated" in result.stderr


def test_jsonl_in_and_out_keeps_the_other_fields(t5_dir, expected, tmp_path):
    records = [{"id": f"doc-{i}", "meta": {"n": i}, "body": line} for i, line in enumerate(LINES[:9])]
    inputs = tmp_path / "in.jsonl"
    inputs.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    target = tmp_path / "out.jsonl"
    result = _run(t5_dir, "-i", inputs, "--input-format", "jsonl", "--input-field", "body", "-o", target,
                  *SMALL_WINDOWS, *FAST)
    assert result.exit_code == 0, result.output
    out = [json.loads(line) for line in target.read_text(encoding="utf-8").splitlines()]
    assert out == [dict(r, outputs=[e]) for r, e in zip(records, expected[:9], strict=True)]

    result = _run(t5_dir, "-i", inputs, "--input-format", "jsonl", "--input-field", "body", "--json", *FAST)
    assert result.exit_code == 0, result.output
    first = json.loads(result.stdout.splitlines()[0])
    assert first["id"] == "doc-0" and first["outputs"] == expected[:1] and first["scores"] is None
    assert len(first["token_ids"]) == 1


@pytest.mark.parametrize("line, fragment", [
    ('{"id": 1}', "has no such field"),
    ('{"text": 3}', "holds a int"),
    ('[1, 2]', "not an object"),
    ('{"text": "hi", "outputs": []}', "'outputs'"),
    ('not json', "is not JSON"),
])
def test_bad_jsonl_lines_are_named(t5_dir, tmp_path, line, fragment):
    inputs = _write(tmp_path / "in.jsonl", ['{"text": "Anna reads."}', line])
    assert_one_line_error(_run(t5_dir, "-i", inputs, "--input-format", "jsonl", *FAST), "line 2 of", fragment)


def test_progress_bar_on_a_terminal_only(t5_dir, tmp_path):
    inputs = _write(tmp_path / "in.txt", LINES[:8])
    command = [sys.executable, "-c", "from runtime.cli import main; main()", str(t5_dir), "-i", str(inputs),
               *map(str, FAST)]
    piped = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert piped.returncode == 0, piped.stderr
    assert "\r" not in piped.stderr and "/8" not in piped.stderr
    assert "8 input(s) in" in piped.stderr and "generated tokens/s" in piped.stderr  # the summary stays

    leader, follower = pty.openpty()  # stderr on a terminal
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    shown = b""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        ready, _, _ = select.select([leader], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closes when the process ends
                break
            if not chunk:
                break
            shown += chunk
        elif process.poll() is not None:
            break
    os.close(leader)
    assert process.wait(timeout=30) == 0, shown.decode(errors="replace")
    text = shown.decode(errors="replace")
    assert "8/8" in text and "lines/s" in text and "generated tokens/s" in text
