"""s2s-bench runs end to end on a tiny model and writes a well-formed report. No timing is asserted:
the numbers are for reading, not for passing."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from bench import breakdown, report
from bench.cli import _compare_with_eager, _merge, main

NEW_TOKENS = 4


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One small s2s-bench run: every engine that is installed, greedy, batch 1 and 2, with --breakdown."""
    tmp = tmp_path_factory.mktemp("bench")
    out_dir = tmp / "out"
    args = ["--model", "tiny-t5", "--device", "cpu", "--num-beams", "1", "--batch-size", "1,2", "--src-len", "8",
            "--new-tokens", str(NEW_TOKENS), "--precision", "fp32", "--threads", "1", "--warmup", "0",
            "--repeats", "2", "--one-process", "--breakdown", "--out", str(out_dir), "--cache-dir", str(tmp / "cache")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result.output, out_dir, json.loads((out_dir / "results.json").read_text(encoding="utf-8"))


def test_results_json_is_well_formed(bench_run):
    _, _, results = bench_run
    assert results["schema_version"] == report.SCHEMA_VERSION
    for key in ("machine", "versions", "settings", "results", "notes", "command", "created"):
        assert key in results
    assert results["settings"]["threads"] == 1
    assert results["machine"]["usable_cores"] >= 1
    ran = {(r["engine"], r["precision"]) for r in results["results"]}
    assert {("eager", "fp32"), ("s2s", "fp32")} <= ran
    for record in results["results"]:
        assert set(report.RECORD_KEYS) <= set(record), record
        assert record["status"] == "ok", record.get("note")
        assert len(record["latencies_ms"]) == 2
        assert record["median_ms"] > 0 and record["p90_ms"] >= record["median_ms"] * 0.999
        assert record["tokens_per_s"] > 0 and record["peak_rss_mb"] > 0
        assert record["speedup_vs_eager"] > 0
        tokens = np.load(record["tokens_file"])
        assert tokens.shape == (record["batch_size"], 1 + NEW_TOKENS) and tokens.dtype == np.int64
    skipped = {note["engine"] for note in results["notes"]}
    assert {r["engine"] for r in results["results"]} | skipped >= {"eager", "s2s", "optimum", "ct2"}


def test_identical_token_flag_is_computed_against_eager(bench_run):
    _, _, results = bench_run
    eager = {r["batch_size"]: np.load(r["tokens_file"]) for r in results["results"] if r["engine"] == "eager"}
    for record in results["results"]:
        expected = np.array_equal(np.load(record["tokens_file"]), eager[record["batch_size"]])
        assert record["identical_to_eager"] is expected
        assert 0.0 <= record["token_match"] <= 1.0
    # fp32 exports follow eager PyTorch token for token on this model
    assert all(r["identical_to_eager"] for r in results["results"] if r["engine"] == "s2s" and r["precision"] == "fp32")


def test_table_is_printed(bench_run):
    output, _, results = bench_run
    header = [line for line in output.splitlines() if "median ms" in line and "same tokens" in line]
    assert header, output
    rows = [line for line in output.splitlines() if line.startswith("tiny-t5")]
    assert len(rows) == len(results["results"])
    assert any(" ref" in row for row in rows) and any(" s2s " in row for row in rows)
    assert "threads: 1 for every engine" in output


def test_files_written(bench_run):
    _, out_dir, results = bench_run
    for name in ("chart.png", "breakdown.png"):
        data = (out_dir / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    table = (out_dir / "table.md").read_text(encoding="utf-8")
    assert table.count("\n| tiny-t5 |") == len(results["results"])


def test_breakdown_accounts_for_every_session_run(bench_run):
    _, _, results = bench_run
    with_breakdown = [r for r in results["results"] if r.get("breakdown")]
    assert {r["engine"] for r in with_breakdown} >= {"s2s"}
    assert not [r for r in with_breakdown if r["engine"] in ("eager", "ct2")]  # no onnxruntime sessions there
    for record in with_breakdown:
        b = record["breakdown"]
        assert b["inside_ms"] + b["outside_ms"] == pytest.approx(b["total_ms"])
        assert 0 <= b["outside_pct"] <= 100
        # the encoder once, then one decoder run per generated token (cross-attention K/V may add a graph)
        assert len(b["runs"]) >= 1 + NEW_TOKENS
        assert sum(g["runs"] for g in b["per_graph"].values()) == len(b["runs"])
        assert all(run["inside_ms"] >= 0 and run["outside_before_ms"] >= 0 for run in b["runs"])


def test_split_call_arithmetic():
    runs = [breakdown.Run("encoder", 1.0, 1.5), breakdown.Run("decoder", 1.6, 1.9), breakdown.Run("decoder", 2.0, 2.2)]
    call = breakdown.split_call(runs, call_start=0.9, call_end=2.5)
    assert call["total_ms"] == pytest.approx(1600)
    assert call["inside_ms"] == pytest.approx(1000)
    assert call["outside_ms"] == pytest.approx(600)
    assert [r["outside_before_ms"] for r in call["runs"]] == pytest.approx([100, 100, 100])
    assert call["tail_ms"] == pytest.approx(300)
    summary = breakdown.summarize([call, call])
    assert summary["per_graph"]["decoder"]["runs"] == 2
    assert summary["outside_pct"] == pytest.approx(37.5)


def test_timed_sessions_restores_the_session_methods():
    class Session:
        def run(self, outputs, feeds):
            return [feeds["x"] * 2]

        def run_with_iobinding(self, binding):
            return None

    session = Session()
    with breakdown.timed_sessions({"g": session}) as runs:
        assert session.run(None, {"x": 3}) == [6]
    assert len(runs) == 1 and runs[0].graph == "g" and runs[0].end >= runs[0].start
    assert "run" not in vars(session) and "run_with_iobinding" not in vars(session)


def test_compare_with_eager_marks_differences(tmp_path):
    def record(engine: str, tokens: list[list[int]], median_ms: float) -> dict:
        path = tmp_path / f"{engine}.npy"
        np.save(path, np.array(tokens, dtype=np.int64))
        return dict(model="m", engine=engine, device="cpu", precision="fp32", num_beams=1, batch_size=2, src_len=8,
                    new_tokens=2, status="ok", median_ms=median_ms, tokens_file=str(path))

    records = [record("eager", [[0, 5, 6], [0, 7, 8]], 100.0), record("s2s", [[0, 5, 6], [0, 7, 9]], 25.0)]
    _compare_with_eager(records)
    assert records[0]["identical_to_eager"] is True and records[0]["speedup_vs_eager"] == 1.0
    assert records[1]["identical_to_eager"] is False
    assert records[1]["token_match"] == pytest.approx(5 / 6)
    assert records[1]["speedup_vs_eager"] == pytest.approx(4.0)


def test_rounds_pool_timed_calls_and_breakdown_calls():
    def call(total_ms: float) -> dict:
        return breakdown.split_call([breakdown.Run("decoder", 0.0, total_ms / 2000)], 0.0, total_ms / 1000)

    def round_record(latencies: list[float], rss: float) -> dict:
        return dict(status="ok", latencies_ms=latencies, generated_tokens=8, load_s=1.0, peak_rss_mb=rss,
                    peak_gpu_mb=None, breakdown_calls=[call(ms) for ms in latencies])

    merged = _merge((round_record([10.0, 30.0], 100.0), round_record([20.0], 120.0)))
    assert merged["latencies_ms"] == [10.0, 30.0, 20.0]
    assert merged["median_ms"] == pytest.approx(20.0)
    assert merged["tokens_per_s"] == pytest.approx(400.0)
    assert merged["peak_rss_mb"] == 120.0 and merged["peak_gpu_mb"] is None
    assert merged["breakdown"]["calls"] == 3 and merged["breakdown"]["total_ms"] == pytest.approx(20.0)
    assert "breakdown_calls" not in merged
    failed = dict(status="failed", note="boom")
    assert _merge((round_record([10.0], 1.0), failed)) is failed


def test_unknown_model_is_one_line_error(tmp_path):
    result = CliRunner().invoke(main, ["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.startswith("Error: --model") and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
