"""s2s-bench runs end to end on a tiny model, interleaves its engines call by call, and judges the goals
of issue 10 from what it measured. No timing is asserted: the numbers are for reading, not for passing;
the arithmetic on them (paired ratios, step windows, goal verdicts) is checked on made-up timings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bench import breakdown, compare, goals, ratios, report, step_cost
from bench.cli import _compare_with_eager, main
from bench.compare import Contestant, Slot, rotation, run_case, run_cases
from bench.engines import s2s as s2s_engine
from bench.pool import WorkerFailed
from bench.sources import resolve

NEW_TOKENS = 4
REPEATS = 2


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    """One small s2s-bench run: every engine that is installed, greedy, batch 1 and 2, --breakdown, --step-cost."""
    tmp = tmp_path_factory.mktemp("bench")
    out_dir = tmp / "out"
    args = ["--model", "tiny-t5", "--device", "cpu", "--num-beams", "1", "--batch-size", "1,2", "--src-len", "8",
            "--new-tokens", str(NEW_TOKENS), "--precision", "fp32", "--threads", "1", "--warmup", "0",
            "--repeats", str(REPEATS), "--one-process", "--breakdown", "--step-cost", "--out", str(out_dir),
            "--cache-dir", str(tmp / "cache")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compare, "SETTLE_S", 0.0)  # no thread pool of these tiny models spins long enough to matter
        result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return result.output, out_dir, json.loads((out_dir / "results.json").read_text(encoding="utf-8")), tmp / "cache"


@pytest.mark.slow
def test_results_json_is_well_formed(bench_run):
    _, _, results, _ = bench_run
    assert results["schema_version"] == report.SCHEMA_VERSION
    for key in ("machine", "versions", "settings", "results", "notes", "command", "created", "ratios", "step_cost",
                "goals"):
        assert key in results
    assert results["settings"]["threads"] == 1
    assert results["machine"]["usable_cores"] >= 1
    ran = {(r["engine"], r["precision"]) for r in results["results"]}
    assert {("eager", "fp32"), ("s2s", "fp32")} <= ran
    for record in results["results"]:
        assert set(report.RECORD_KEYS) <= set(record), record
        assert record["status"] == "ok", record.get("note")
        assert len(record["latencies_ms"]) == REPEATS
        assert record["p10_ms"] <= record["median_ms"] <= record["p90_ms"]
        assert record["tokens_per_s"] > 0 and record["peak_rss_mb"] > 0
        assert record["speedup_vs_eager"] > 0
        tokens = np.load(record["tokens_file"])
        assert tokens.shape == (record["batch_size"], 1 + NEW_TOKENS) and tokens.dtype == np.int64
    skipped = {note["engine"] for note in results["notes"]}
    assert {r["engine"] for r in results["results"]} | skipped >= {"eager", "s2s", "optimum", "ct2"}


@pytest.mark.slow
def test_each_round_starts_one_engine_later(bench_run):
    _, _, results, _ = bench_run
    for batch in (1, 2):
        case = [r for r in results["results"] if r["batch_size"] == batch]  # in the contestants' order
        for index, record in enumerate(case):
            assert record["positions"] == [(index - r) % len(case) for r in range(REPEATS)], record["engine"]


@pytest.mark.slow
def test_identical_token_flag_is_computed_against_eager(bench_run):
    _, _, results, _ = bench_run
    eager = {r["batch_size"]: np.load(r["tokens_file"]) for r in results["results"] if r["engine"] == "eager"}
    for record in results["results"]:
        expected = np.array_equal(np.load(record["tokens_file"]), eager[record["batch_size"]])
        assert record["identical_to_eager"] is expected
        assert 0.0 <= record["token_match"] <= 1.0
    # fp32 exports follow eager PyTorch token for token on this model
    assert all(r["identical_to_eager"] for r in results["results"] if r["engine"] == "s2s" and r["precision"] == "fp32")


@pytest.mark.slow
def test_ratios_come_from_the_recorded_rounds(bench_run):
    _, _, results, _ = bench_run
    records = results["results"]
    peers = [r for r in records if r["engine"] in ratios.PEERS]
    if not peers:
        pytest.skip("neither optimum nor ct2 is installed")
    for batch in (1, 2):
        mine = next(r for r in records if r["engine"] == "s2s" and r["batch_size"] == batch)
        best = min((r for r in peers if r["batch_size"] == batch), key=lambda r: r["median_ms"])
        expected = np.median([p / s for s, p in zip(mine["latencies_ms"], best["latencies_ms"])])
        assert mine["speedup_vs_best_peer"] == pytest.approx(expected)
        entry = ratios.find(results["ratios"], "vs_best_peer", batch_size=batch, precision="fp32")
        assert entry["against"] == f"{best['engine']} fp32" and entry["pairs"] == REPEATS


@pytest.mark.slow
def test_table_and_goals_are_printed(bench_run):
    output, _, results, _ = bench_run
    header = [line for line in output.splitlines() if "median ms" in line and "same tokens" in line]
    assert header, output
    rows = [line for line in output.splitlines() if line.startswith("tiny-t5")]
    assert len(rows) == len(results["results"])
    assert any(" ref" in row for row in rows) and any(" s2s " in row for row in rows)
    assert "threads: 1 for every engine" in output
    assert "Goals of issue 10" in output
    for line in results["goals"]:
        assert f"{line['goal']} | {line['where']} | {line['measured']}" in output


@pytest.mark.slow
def test_files_written(bench_run):
    _, out_dir, results, _ = bench_run
    for name in ("chart.png", "breakdown.png"):
        data = (out_dir / name).read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 1000
    table = (out_dir / "table.md").read_text(encoding="utf-8")
    assert table.count("\n| tiny-t5 |") == len(results["results"])
    assert table.count("\n| pass |") + table.count("\n| fail |") + table.count("\n| not measured |") \
        == len(results["goals"])


@pytest.mark.slow
def test_breakdown_accounts_for_every_session_run(bench_run):
    _, _, results, _ = bench_run
    with_breakdown = [r for r in results["results"] if r.get("breakdown")]
    assert {r["engine"] for r in with_breakdown} >= {"s2s"}
    assert not [r for r in with_breakdown if r["engine"] in ("eager", "ct2")]  # no onnxruntime sessions there
    for record in with_breakdown:
        b = record["breakdown"]
        assert b["calls"] == REPEATS
        assert b["inside_ms"] + b["outside_ms"] == pytest.approx(b["total_ms"])
        assert 0 <= b["outside_pct"] <= 100
        # the encoder once, then one decoder run per generated token (cross-attention K/V may add a graph)
        assert len(b["runs"]) >= 1 + NEW_TOKENS
        assert sum(g["runs"] for g in b["per_graph"].values()) == len(b["runs"])
        assert all(run["inside_ms"] >= 0 and run["outside_before_ms"] >= 0 for run in b["runs"])


@pytest.mark.slow
def test_step_cost_is_measured_at_both_past_lengths(bench_run):
    _, _, results, _ = bench_run
    [entry] = results["step_cost"]
    assert (entry["model"], entry["precision"], entry["num_beams"], entry["batch_size"]) == ("tiny-t5", "fp32", 1, 1)
    assert entry["new_tokens"] == step_cost.STEP_COST_NEW_TOKENS and entry["calls"] == REPEATS
    assert entry["method"] == "paired steps" and all(entry["step_ms"][str(p)] > 0 for p in step_cost.PASTS)
    assert entry["ratio_p10"] <= entry["ratio"] <= entry["ratio_p90"]
    line = next(g for g in results["goals"] if g["goal"].startswith("per-step cost"))
    assert line["status"] == (goals.PASS if entry["ratio"] <= goals.STEP_RATIO else goals.FAIL)


def test_step_times_split_a_call_at_decoder_runs():
    # encoder, then decoder runs (past 0, 1, 2) with a second graph inside step 1
    runs = [dict(graph="encoder", inside_ms=5.0, outside_before_ms=1.0),
            dict(graph="decoder", inside_ms=2.0, outside_before_ms=0.5),
            dict(graph="decoder", inside_ms=3.0, outside_before_ms=0.25),
            dict(graph="topk", inside_ms=1.0, outside_before_ms=0.25),
            dict(graph="decoder", inside_ms=2.0, outside_before_ms=1.0)]
    whole, inside = step_cost.step_times({"runs": runs})
    assert whole == pytest.approx([2.0 + 0.25, 3.0 + 0.25 + 1.0 + 1.0])
    assert inside == pytest.approx([2.0, 4.0])


def test_step_cost_ratio_is_taken_within_each_call():
    def call(at_16: float, at_512: float) -> dict:
        n = step_cost.STEP_COST_NEW_TOKENS
        return {"runs": [dict(graph="decoder", inside_ms=at_512 if k > 256 else at_16, outside_before_ms=0.0)
                         for k in range(n)]}

    record = dict(model="m", device="cpu", precision="fp32", num_beams=1, batch_size=1, src_len=8,
                  new_tokens=step_cost.STEP_COST_NEW_TOKENS, breakdown_calls=[call(1.0, 1.1), call(2.0, 2.6),
                                                                             call(4.0, 4.8)])
    entry = step_cost.analyze(record)
    assert entry["ratio"] == pytest.approx(1.2)  # per-call 1.1, 1.3, 1.2; a ratio of medians would say 2.6/2.0
    assert entry["step_ms"] == pytest.approx({"16": 2.0, "512": 2.6})
    record["breakdown_calls"] = [{"runs": call(1.0, 1.0)["runs"][:500]}]
    with pytest.raises(ValueError, match="past 512"):
        step_cost.analyze(record)


def test_paired_step_ratio_is_the_median_of_pairs():
    record = dict(model="m", device="cpu", precision="fp32", num_beams=1, batch_size=1, src_len=8,
                  new_tokens=step_cost.STEP_COST_NEW_TOKENS,
                  step_calls=[{"16": [1.0, 2.0, 4.0], "512": [1.1, 2.6, 4.4]}, {"16": [10.0], "512": [10.0]}])
    entry = step_cost.analyze(record)
    assert entry["method"] == "paired steps" and entry["calls"] == 2
    assert entry["ratio"] == pytest.approx(1.1)  # pairs 1.1, 1.3, 1.1, 1.0; the medians' ratio would be 3.5 / 3.0
    assert entry["step_ms"] == pytest.approx({"16": 3.0, "512": 3.5})


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


@pytest.mark.parametrize("vocab", [1280, 1300])  # a multiple of the 128-wide blocks, and one padded with -inf
def test_beam_probe_ranking_variants_rank_like_the_shipped_graph(vocab):
    """bench/beam_probes.py times two variants of the beam ranking graph; its numbers mean something only
    if they rank exactly as the shipped graph does, exact ties (integer logits) and -inf included."""
    from bench import beam_probes

    sessions = {name: beam_probes._helper_session(proto) for name, proto in beam_probes._ranking_variants().items()}
    rng = np.random.default_rng(vocab)
    logits = np.round(rng.standard_normal((8, 1, vocab)) * 2).astype(np.float32)
    logits[0, 0, 5:] = -np.inf  # a row with fewer finite logits than a block
    feeds = beam_probes._ranking_feeds(8, vocab, logits, seed=1)
    reference = sessions["shipped"].run(None, feeds["shipped"])
    assert len(np.unique(logits[1])) < vocab / 10  # exact ties, many of them
    for name in ("blocked", "lean"):
        got = sessions[name].run(None, feeds[name])
        assert all(np.array_equal(a, b) for a, b in zip(reference, got)), name


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


# -- interleaving, with stand-in workers ---------------------------------------------------------------
class FakeWorker:
    """Answers like bench/worker.py; logs every call into a shared list; can fail at a given call."""

    def __init__(self, name: str, log: list, ms: float = 10.0, fail_at: tuple[str, int] | None = None,
                 alive: bool = True):
        self.name, self.log, self.ms, self.fail_at, self.alive = name, log, ms, fail_at, alive
        self.count: dict[str, int] = {}

    def call(self, op: str, **fields):
        self.count[op] = self.count.get(op, 0) + 1
        if self.fail_at == (op, self.count[op]):
            raise WorkerFailed("boom", alive=self.alive)
        self.log.append((self.name, op))
        return {"time": {"ms": self.ms}, "breakdown": {"call": {}},
                "finish": {"peak_rss_mb": 1.0, "generated_tokens": 4, "tokens_file": "t.npy"}}.get(op, {})

    def end_input(self):
        pass

    def close(self):
        pass


def _slots(names: list[str], log: list) -> list[Slot]:
    source = resolve_stub()
    return [Slot(Contestant(name, "fp32", "cpu", source, Path(name)), FakeWorker(name, log, ms=10.0 * (i + 1)),
                 load_s=0.0, has_sessions=True) for i, name in enumerate(names)]


def resolve_stub():
    from bench.sources import ModelSource

    return ModelSource(name="m", checkpoint=None, checkpoint_format="transformers", export_dir=None,
                       export_precision=None, vocab_size=10, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)


SETTINGS = dict(warmup=1, repeats=5, breakdown=True, threads=1, seed=0, one_process=True)
CASE = dict(id="c", num_beams=1, batch_size=1, src_len=8, new_tokens=4)


def test_rotation():
    assert [rotation(3, r) for r in range(4)] == [[0, 1, 2], [1, 2, 0], [2, 0, 1], [0, 1, 2]]


def test_calls_are_interleaved_round_by_round(monkeypatch):
    monkeypatch.setattr(compare, "SETTLE_S", 0.0)
    log: list = []
    names = ["eager", "s2s", "ct2"]
    records = run_case(_slots(names, log), CASE, SETTINGS, say=lambda m: None)
    timed = [name for name, op in log if op == "time"]
    assert timed == [names[i] for r in range(SETTINGS["repeats"]) for i in rotation(3, r)]
    ops = [op for _, op in log]
    assert ops == sorted(ops, key=["case", "warmup", "time", "breakdown", "finish"].index)  # one phase after another
    assert [r["positions"] for r in records] == [[0, 2, 1, 0, 2], [1, 0, 2, 1, 0], [2, 1, 0, 2, 1]]
    assert [r["median_ms"] for r in records] == [10.0, 20.0, 30.0]
    assert all(len(r["breakdown_calls"]) == SETTINGS["repeats"] for r in records)


def test_a_failing_engine_is_reported_and_the_others_go_on(monkeypatch):
    monkeypatch.setattr(compare, "SETTLE_S", 0.0)
    log: list = []
    slots = _slots(["eager", "s2s", "ct2"], log)
    slots[1].process.fail_at, slots[1].process.alive = ("time", 2), False  # dies in its second timed call
    records = run_case(slots, CASE, SETTINGS, say=lambda m: None)
    assert records[1]["status"] == "failed" and "time failed: boom" in records[1]["note"]
    assert [r["status"] for r in (records[0], records[2])] == ["ok", "ok"]
    assert len(records[0]["latencies_ms"]) == len(records[2]["latencies_ms"]) == SETTINGS["repeats"]
    assert [name for name, op in log if op == "time"].count("s2s") == 1
    again = run_case(slots, CASE, SETTINGS, say=lambda m: None)  # the next case: gone for good, not retried
    assert again[1]["status"] == "failed" and "worker gone" in again[1]["note"]
    assert again[0]["status"] == again[2]["status"] == "ok"


@pytest.mark.slow
def test_an_engine_that_cannot_load_is_a_failed_record(bench_run, tmp_path):
    *_, cache_dir = bench_run
    source = resolve("tiny-t5", cache_dir)
    good = s2s_engine.prepare(source, "fp32", "cpu", cache_dir)  # built by the run: cached
    (tmp_path / "broken").mkdir()
    contestants = [Contestant("s2s", "fp32", "cpu", source, good), Contestant("s2s", "int8", "cpu", source,
                                                                              tmp_path / "broken")]
    (tmp_path / "tokens").mkdir()
    (tmp_path / "logs").mkdir()
    settings = dict(SETTINGS, warmup=0, repeats=1, breakdown=False, one_process=False)
    ok, broken = run_cases(contestants, [CASE], settings, tmp_path / "tokens", tmp_path / "logs", say=lambda m: None)
    assert ok["status"] == "ok" and len(ok["latencies_ms"]) == 1
    assert broken["status"] == "failed" and broken["note"].startswith("loading failed: ExportDirError")


# -- ratios and goals on made-up results -----------------------------------------------------------
def _record(engine: str, precision: str, latencies: list[float], num_beams: int = 1, batch_size: int = 1,
            **extra) -> dict:
    median = float(np.median(latencies))
    return dict(model="t5-small", engine=engine, device="cpu", precision=precision, num_beams=num_beams,
                batch_size=batch_size, src_len=32, new_tokens=64, length_rule="min_new_tokens", status="ok",
                latencies_ms=latencies, median_ms=median, tokens_per_s=batch_size * 64 / (median / 1000),
                peak_rss_mb=500.0, identical_to_eager=True, **extra)


def test_ratios_are_medians_of_paired_calls():
    records = [_record("s2s", "fp32", [100.0, 300.0, 200.0]), _record("optimum", "fp32", [160.0, 290.0, 500.0]),
               _record("ct2", "fp32", [400.0, 400.0, 400.0]), _record("s2s", "int8", [50.0, 100.0, 200.0]),
               _record("s2s", "fp32", [400.0], batch_size=32)]
    found = ratios.compute(records)
    peer = ratios.find(found, "vs_best_peer", precision="fp32", batch_size=1)
    # optimum is the faster peer (median 290 < 400); per round 1.6, 0.967, 2.5 -> 1.6 (medians would say 1.45)
    assert peer["against"] == "optimum fp32" and peer["value"] == pytest.approx(1.6) and peer["pairs"] == 3
    assert ratios.find(found, "vs_fp32", precision="int8")["value"] == pytest.approx(2.0)  # 2, 3, 1
    scaling = ratios.find(found, "batch_scaling", batch_size=32, precision="fp32")
    assert scaling["value"] == pytest.approx(32 * 200 / 400) and not scaling["paired"]
    assert ratios.find(found, "vs_best_peer", precision="int8") is None  # no int8 peer ran
    with pytest.raises(ValueError, match="same rounds"):
        ratios.paired_speedups([1.0, 2.0], [1.0])


def _results(records: list[dict], **extra) -> dict:
    results = dict(results=records, notes=[], ratios=ratios.compute(records), step_cost=[], accuracy=None,
                   baseline=None)
    results.update(extra)
    return results


def _status(lines: list[dict], goal_start: str, where_start: str = "") -> str:
    [line] = [g for g in lines if g["goal"].startswith(goal_start) and g["where"].startswith(where_start)]
    return line["status"]


def test_goal_lines_pass_fail_or_not_measured():
    call = breakdown.split_call([breakdown.Run("decoder", 0.0, 0.098)], 0.0, 0.1)  # 2% outside
    records = [_record("s2s", "fp32", [100.0, 100.0], breakdown=breakdown.summarize([call])),
               _record("ct2", "fp32", [140.0, 140.0]),  # 1.4x: pass
               _record("s2s", "int8", [60.0, 60.0]), _record("ct2", "int8", [66.0, 66.0]),  # 1.1x: fail
               _record("s2s", "fp32", [400.0, 400.0], batch_size=32)]  # 8x the tokens/s of batch 1: fail
    step = dict(model="t5-small", device="cpu", precision="fp32", num_beams=1, batch_size=1, src_len=32,
                new_tokens=528, calls=3, step_ms={"16": 5.0, "512": 5.5}, inside_ms={"16": 4.9, "512": 5.4},
                ratio=1.1, ratio_p10=1.05, ratio_p90=1.15, inside_ratio=1.1, method="within a call")
    accuracy = dict(model="demo", examples=400, exact_match={"fp32": {"1": 0.9975, "4": 0.9975},
                                                             "int8": {"1": 0.9950, "4": 0.9900}})
    lines = goals.judge(_results(records, step_cost=[step], accuracy=accuracy))
    assert {g["status"] for g in lines} <= set(goals.STATUSES)
    peer = "s2s >= 1.3x"
    assert _status(lines, peer, "t5-small src 32, greedy, batch 1, fp32") == goals.PASS
    assert _status(lines, peer, "t5-small src 32, greedy, batch 1, int8") == goals.FAIL
    assert _status(lines, peer, "t5-small src 32, beam 4, batch 8, int8") == goals.NOT_MEASURED
    assert _status(lines, "s2s int8 >= 2.0x") == goals.FAIL  # 100 / 60
    assert _status(lines, "time outside session.run <= 3%") == goals.PASS
    assert _status(lines, "time outside session.run <= 5%") == goals.NOT_MEASURED  # no beam search ran
    assert _status(lines, "per-step cost") == goals.PASS
    assert _status(lines, "greedy tokens/s", "t5-small src 32, s2s fp32") == goals.FAIL
    assert _status(lines, "greedy tokens/s", "t5-small src 32, s2s int8") == goals.NOT_MEASURED
    assert _status(lines, "int8 exact match", "demo held-out, greedy") == goals.PASS  # -0.25 points
    assert _status(lines, "int8 exact match", "demo held-out, beam 4") == goals.FAIL  # -0.75 points
    assert _status(lines, "s2s peak RSS") == goals.NOT_MEASURED  # no baseline given
    assert _status(lines, "s2s fp32 tokens identical") == goals.PASS
    assert _status(lines, "GPU") == goals.NOT_MEASURED

    bare = goals.judge(_results(records[:1]))  # nothing but one s2s timing
    assert _status(bare, "per-step cost") == _status(bare, "int8 exact match", "demo held-out, beam 4") \
        == _status(bare, peer, "t5-small src 32, greedy, batch 1, fp32") == goals.NOT_MEASURED


def test_rss_goal_against_a_baseline():
    records = [_record("s2s", "fp32", [100.0]), _record("s2s", "int8", [50.0])]
    records[1]["peak_rss_mb"] = 530.0
    keys = ("model", "precision", "num_beams", "batch_size", "src_len", "new_tokens")
    baseline = {"file": "old.json", "records": [dict({k: r[k] for k in keys}, peak_rss_mb=500.0) for r in records]}
    lines = goals.judge(_results(records, baseline=baseline))
    assert _status(lines, "s2s peak RSS", "t5-small s2s fp32") == goals.PASS
    assert _status(lines, "s2s peak RSS", "t5-small s2s int8") == goals.FAIL  # 6% above


def test_report_shows_a_failed_engine(capsys):
    records = [_record("s2s", "fp32", [100.0], p10_ms=100.0, p90_ms=100.0, speedup_vs_eager=None, peak_gpu_mb=None,
                       token_match=1.0),
               dict(model="t5-small", engine="ct2", device="cpu", precision="fp32", num_beams=1, batch_size=1,
                    src_len=32, new_tokens=64, length_rule="min_new_tokens", status="failed",
                    note="loading failed: RuntimeError: no")]
    results = _results(records, machine=dict(cpu="x", usable_cores=2, memory_gib=1, others_cpu_pct=None),
                       settings=dict(threads=2, new_tokens=64, warmup=1, repeats=1, one_process=False),
                       versions={}, command="s2s-bench", created="2026-01-01")
    results["goals"] = goals.judge(results)
    report.print_report(results)
    out = capsys.readouterr().out
    assert "failed: ct2 cpu fp32 t5-small greedy batch 1 src 32: loading failed: RuntimeError: no" in out
    assert "Goals of issue 10" in out and "failed" in report.markdown_table(results)


# -- int8 accuracy on the demo model -----------------------------------------------------------------
@pytest.mark.slow
def test_accuracy_scores_fp32_like_the_pytorch_reference(tmp_path):
    from tokenizers import Tokenizer

    from bench.accuracy import SEARCHES, measure
    from demo import DEMO_DIR, HELD_OUT_PER_TASK
    from models.checkpoint import load_checkpoint
    from models.evaluate import exact_match, predict
    from models.tasks import held_out_examples
    from tests.custom_models import torch_threads

    examples = held_out_examples(HELD_OUT_PER_TASK)[::20]  # 20 instructions, every task
    accuracy = measure(tmp_path, threads=1, examples=examples)
    assert accuracy["examples"] == len(examples) and set(accuracy["exact_match"]) == set(s2s_engine.precisions("cpu"))
    checkpoint = load_checkpoint(DEMO_DIR)
    tokenizer = Tokenizer.from_file(str(checkpoint.tokenizer_file))
    with torch_threads(1):
        for beams in SEARCHES:
            expected = predict(checkpoint.model, tokenizer, checkpoint.config.special_tokens, [s for s, _ in examples],
                               max_new_tokens=checkpoint.config.generation["max_new_tokens"], num_beams=beams)
            assert accuracy["exact_match"]["fp32"][str(beams)] == exact_match(expected, [t for _, t in examples])
    lines = goals.judge(_results([], accuracy=accuracy))
    assert _status(lines, "int8 exact match", "demo held-out, greedy") in (goals.PASS, goals.FAIL)


def test_unknown_model_is_one_line_error(tmp_path):
    result = CliRunner().invoke(main, ["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.startswith("Error: --model") and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_a_baseline_that_is_not_results_json_is_one_line_error(tmp_path):
    (tmp_path / "old.json").write_text('{"results": [{"engine": "s2s"}]}', encoding="utf-8")
    result = CliRunner().invoke(main, ["--quick", "--baseline", str(tmp_path / "old.json"),
                                       "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "not an s2s-bench results.json (no field 'device')" in result.output
    assert not (tmp_path / "out").exists()
