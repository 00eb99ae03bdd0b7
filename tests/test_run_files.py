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


# LINES in windows of 4 and batches of 3 (a window's results are written as each of its batches ends and completes
# a prefix of it): the partial can be caught mid-window holding 1, 7, 9, 15, 19, 21 or 25 lines, each followed by
# a batch's work (20 new tokens make it long enough to catch). At each of them, a resume cutting its windows from
# there gives other sampled texts and other beam scores.
KILLED_LINES = LINES
KILL_WINDOW = 4
KILL_TOKENS = ["--max-new-tokens", 20]


def _stopped_state(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] in "Tt"


def _kill_mid_window(command: list[str], partial: Path) -> int:
    """Run `command` (s2s-run -o ... --window 4) on a stdin holding KILLED_LINES that this test keeps open, so the
    run cannot finish, and SIGKILL it while a window is half written. The run goes in short bursts between
    SIGSTOPs; it is killed, still stopped, the first time its partial holds a count of complete lines that is not
    a multiple of the window. Returns that count."""
    process = subprocess.Popen(command, cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        process.stdin.write("".join(line + "\n" for line in KILLED_LINES).encode())
        process.stdin.flush()
        deadline = time.monotonic() + 120
        seen: set[int] = set()
        while True:
            time.sleep(0.002)
            process.send_signal(signal.SIGSTOP)
            while process.poll() is None and not _stopped_state(process.pid):  # the signal lands asynchronously
                time.sleep(0.0005)
            assert process.poll() is None, process.stderr.read().decode()
            done = _complete_lines(partial)
            assert done < len(KILLED_LINES), "every window was written before a kill landed mid-window"
            if done % KILL_WINDOW:
                process.send_signal(signal.SIGKILL)
                break
            seen.add(done)
            assert time.monotonic() < deadline, f"no half-written window within 120 s (lines seen: {sorted(seen)})"
            process.send_signal(signal.SIGCONT)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdin.close()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    return done


@pytest.mark.parametrize("options", [
    ["--json"],  # greedy
    ["--json", "--num-beams", 3],  # beam scores move in their last float32 bits with the batch plan
    ["--do-sample", "--seed", 1],  # every batch draws from the seed again: draws follow the batch plan
], ids=["greedy", "beam-json", "sampling"])
def test_killed_run_then_resume_equals_an_uninterrupted_run(t5_dir, tmp_path, options):
    args = [*options, *SMALL_WINDOWS, *FAST, *KILL_TOKENS]
    inputs = _write(tmp_path / "in.txt", KILLED_LINES)
    reference = tmp_path / "reference.out"
    result = _run(t5_dir, "-i", inputs, "-o", reference, *args)
    assert result.exit_code == 0, result.output

    target = tmp_path / "out.txt"
    partial = tmp_path / "out.txt.partial"
    done = _kill_mid_window([sys.executable, "-c", "from runtime.cli import main; main()", str(t5_dir),
                             "-o", str(target), *map(str, args)], partial)
    assert not target.exists()
    for line, input_line in zip(partial.read_bytes().splitlines()[:done], KILLED_LINES):
        assert json.loads(line)["input"] == input_line  # every complete line is a whole record, in input order

    result = _run(t5_dir, "-i", inputs, "-o", target, "--resume", *args)
    assert result.exit_code == 0, result.output
    assert f"{done} input(s) done" in result.output
    assert target.read_bytes() == reference.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt", "out.txt", "reference.out"]


STOPPING_STDIN = "".join(line + "\n" for line in LINES[:8] + [""] + LINES[9:12])  # line 9 is empty


def _stop_at_an_empty_line(t5_dir: Path, target: Path, *options) -> None:
    """Leave the partial (and its record of options) of a real run: on STOPPING_STDIN, in windows of 4, it fails at
    line 9 with the 8 results before it written."""
    result = _run(t5_dir, "-o", target, *SMALL_WINDOWS, *FAST, *options, input=STOPPING_STDIN)
    assert_one_line_error(result, "line 9 of stdin is empty")
    assert _complete_lines(target.with_name(target.name + ".partial")) == 8


def test_resume_drops_a_torn_last_line(t5_dir, expected, tmp_path):
    inputs = _write(tmp_path / "in.txt", LINES)
    target = tmp_path / "out.txt"
    partial = tmp_path / "out.txt.partial"
    _stop_at_an_empty_line(t5_dir, target)
    records = partial.read_bytes().splitlines(keepends=True)
    partial.write_bytes(b"".join(records[:5]) + records[5][:17])  # as if killed mid-write, mid-window
    result = _run(t5_dir, "-i", inputs, "-o", target, "--resume", *SMALL_WINDOWS, *FAST)
    assert result.exit_code == 0, result.output
    assert "5 input(s) done" in result.output
    assert target.read_text(encoding="utf-8").splitlines() == expected


def _files(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_resume_against_another_file_refuses_and_keeps_the_partial(t5_dir, tmp_path):
    target = tmp_path / "out.txt"
    other = _write(tmp_path / "other.txt", LINES[:2] + ["Something else entirely."] + LINES[3:])
    shorter = _write(tmp_path / "short.txt", LINES[:2])
    _stop_at_an_empty_line(t5_dir, target)
    before = _files(tmp_path)
    assert_one_line_error(_run(t5_dir, "-i", other, "-o", target, "--resume", *SMALL_WINDOWS, *FAST),
                          "other inputs", "line 3")
    assert_one_line_error(_run(t5_dir, "-i", shorter, "-o", target, "--resume", *SMALL_WINDOWS, *FAST),
                          "more results")
    assert _files(tmp_path) == before  # the partial and its options as they were, no FILE


@pytest.mark.parametrize("made, resumed, named", [
    ([], ["--json"], "--json: off then, on now"),
    (["--json"], [], "--json: on then, off now"),
    ([], ["--num-beams", 2], "--num-beams: default then, 2 now"),
    (["--do-sample", "--seed", 1], ["--do-sample", "--seed", 2], "--seed: 1 then, 2 now"),
    ([], ["--window", 5], "--window: 4 then, 5 now"),
    (["--truncate"], [], "--truncate: on then, off now"),
])
def test_resume_with_other_options_refuses_and_keeps_the_partial(t5_dir, tmp_path, made, resumed, named):
    target = tmp_path / "out.txt"
    inputs = _write(tmp_path / "in.txt", LINES[:12])
    _stop_at_an_empty_line(t5_dir, target, *made)
    before = _files(tmp_path)
    result = _run(t5_dir, "-i", inputs, "-o", target, "--resume", *SMALL_WINDOWS, *FAST, *resumed)
    assert_one_line_error(result, "out.txt.partial", "other options", named, "delete it")
    assert _files(tmp_path) == before


def test_resume_may_turn_on_skip_empty_after_a_stop_at_an_empty_line(t5_dir, tmp_path):
    target = tmp_path / "out.txt"
    _stop_at_an_empty_line(t5_dir, target)
    result = _run(t5_dir, "-o", target, "--resume", "--skip-empty", *SMALL_WINDOWS, *FAST, input=STOPPING_STDIN)
    assert result.exit_code == 0, result.output
    uninterrupted = _run(t5_dir, "--skip-empty", *SMALL_WINDOWS, *FAST, input=STOPPING_STDIN)
    assert uninterrupted.exit_code == 0, uninterrupted.output
    assert target.read_text(encoding="utf-8") == uninterrupted.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_a_partial_without_its_options_refuses_to_resume(t5_dir, tmp_path):
    target = tmp_path / "out.txt"
    _stop_at_an_empty_line(t5_dir, target)
    (tmp_path / "out.txt.partial.options").unlink()
    before = _files(tmp_path)
    result = _run(t5_dir, "-i", _write(tmp_path / "in.txt", LINES[:12]), "-o", target, "--resume", *FAST)
    assert_one_line_error(result, "out.txt.partial.options", "delete")
    assert {name: data for name, data in _files(tmp_path).items() if name != "in.txt"} == before


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
    _stop_at_an_empty_line(t5_dir, target)  # the windows before the empty line are kept
    fixed = _write(tmp_path / "fixed.txt", LINES[:12])
    result = _run(t5_dir, "-i", fixed, "-o", target, "--resume", *SMALL_WINDOWS, *FAST)
    assert result.exit_code == 0, result.output
    assert target.read_text(encoding="utf-8").splitlines() == \
        runtime.load(t5_dir, provider="cpu").generate_text(LINES[:12], max_new_tokens=6)


def test_a_too_long_line_names_its_line_number(exported_dir, tmp_path):
    export = exported_dir("bart")
    limit = runtime.load(export, provider="cpu").manifest.max_source_positions
    inputs = _write(tmp_path / "in.txt", LINES[:6] + [" ".join(["word"] * (limit * 2))] + LINES[:2])
    target = tmp_path / "out.txt"
    assert_one_line_error(_run(export, "-i", inputs, "-o", target, *SMALL_WINDOWS, *FAST), "line 7 of", "maximum")
    assert _complete_lines(tmp_path / "out.txt.partial") == 4  # the window before line 7's
    result = _run(export, "-i", inputs, "--truncate", *SMALL_WINDOWS, *FAST)
    assert result.exit_code == 0, result.output
    assert "line 7 of" in result.stderr and "truncated" in result.stderr
    # --resume may turn --truncate on: the partial holds no line it would have cut
    resumed = _run(export, "-i", inputs, "-o", target, "--resume", "--truncate", *SMALL_WINDOWS, *FAST)
    assert resumed.exit_code == 0, resumed.output
    assert target.read_text(encoding="utf-8") == result.stdout


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
