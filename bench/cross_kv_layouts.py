"""Optimum's decoder layouts against the cross-attention-K/V-in-the-encoder layout, on the s2s runtime.

    python -m bench.cross_kv_layouts [--threads 2] [--rounds 2] [--repeats 5] [--src-len 32] [--new-tokens 64]

One optimum export (`main_export`, fp32) of the random-weight t5-small shape (bench/shapes.py), run by
`runtime.load(...).generate` as three directories:
- merged: optimum's directory as written (decoder_model_merged.onnx; the If node re-emits every
  cross-attention K/V each step);
- split: the same without the merged graph (decoder_model.onnx at step 0, decoder_with_past_model.onnx after);
- cross-kv: exporter/passes/cross_kv.py applied (encoder.onnx emits the K/V, decoder.onnx from step 0).
Greedy, batch 1, every row forced to `new_tokens` (min = max). One model is loaded at a time, and
the layouts are measured in turn, `rounds` times (a busy machine shows up as rounds that disagree). Per
call: the wall time; per graph: the median `session.run` time of each kind of run (bench/breakdown.py).

Then the cached decoder step alone, at fixed past lengths, fed and asked what the runtime feeds and
asks after step 0 (logits and the self-attention cache): every layout's decoder loaded at once and run
in alternating blocks, so that a neighbour's load hits all of them alike.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import time
import warnings
from pathlib import Path

import numpy as np

import runtime
from bench.breakdown import timed_sessions
from bench.sources import resolve
from exporter.passes.cross_kv import move_cross_attention_to_encoder
from runtime.optimum_layout import MERGED_DECODER_FILE

LAYOUTS = ("merged", "split", "cross-kv")
# An onnxruntime thread pool keeps spinning for a while after a run (DESIGN.md: tens of ms).
_POOL_IDLE_S = 0.2


def prepare(checkpoint: Path, work_dir: Path) -> dict[str, Path]:
    """The three directories of `checkpoint` under work_dir (exported once, reused afterwards)."""
    from optimum.exporters.onnx import main_export

    dirs = {layout: work_dir / layout for layout in LAYOUTS}
    if all(d.is_dir() for d in dirs.values()):
        return dirs
    shutil.rmtree(work_dir, ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(str(checkpoint), output=dirs["merged"], task="text2text-generation-with-past", do_validation=False)
    shutil.copytree(dirs["merged"], dirs["split"])
    (dirs["split"] / MERGED_DECODER_FILE).unlink()
    shutil.copytree(dirs["split"], dirs["cross-kv"])
    move_cross_attention_to_encoder(dirs["cross-kv"]).write(dirs["cross-kv"])
    return dirs


def measure(export_dir: Path, input_ids: np.ndarray, new_tokens: int, threads: int,
            repeats: int) -> tuple[dict[str, float], np.ndarray]:
    """Median ms of `repeats` generate calls (after one warm-up) and of each kind of session run."""
    model = runtime.load(export_dir, provider="cpu", threads=threads)
    mask = np.ones_like(input_ids)
    options = dict(num_beams=1, min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    tokens = model.generate(input_ids, mask, **options)  # warm-up
    graphs = model.graphs
    sessions = {"encoder": graphs.encoder.session, "decoder": graphs.decoder.session}
    if graphs.first_step is not None:
        sessions["first step"] = graphs.first_step.session
    calls, runs_by_call = [], []
    for _ in range(repeats):
        with timed_sessions(sessions) as runs:
            start = time.perf_counter()
            model.generate(input_ids, mask, **options)
            calls.append((time.perf_counter() - start) * 1000)
        runs_by_call.append(runs)
    result = {"generate": float(np.median(calls))}
    for call in runs_by_call:  # runs in order: encoder, step 0 (first-step graph or decoder), steps 1..
        if call[0].graph != "encoder" or len(call) != new_tokens + 1:
            raise RuntimeError(f"expected the encoder and {new_tokens} decoder runs, found {[r.graph for r in call]}")
    result["encoder"] = float(np.median([(c[0].end - c[0].start) * 1000 for c in runs_by_call]))
    result["step 0"] = float(np.median([(c[1].end - c[1].start) * 1000 for c in runs_by_call]))
    result["step 1+"] = float(np.median([(r.end - r.start) * 1000 for c in runs_by_call for r in c[2:]]))
    del model, graphs, sessions
    gc.collect()  # free the sessions (and their thread pools) before the next layout loads
    return result, tokens


def step_times(dirs: dict[str, Path], past_lengths: list[int], src_len: int, threads: int,
               blocks: int = 30, block: int = 16) -> dict[str, dict[int, float]]:
    """Median ms of one cached decoder step, per layout and past length (layouts interleaved by block)."""
    models = {layout: runtime.load(d, provider="cpu", threads=threads) for layout, d in dirs.items()}
    rng = np.random.default_rng(0)
    result: dict[str, dict[int, float]] = {layout: {} for layout in dirs}
    for past in past_lengths:
        runs = {layout: _cached_step(model, past, src_len, rng) for layout, model in models.items()}
        times: dict[str, list[float]] = {layout: [] for layout in dirs}
        for _ in range(blocks):
            for layout, run in runs.items():
                time.sleep(_POOL_IDLE_S)  # let the last block's session stop spinning (it would take a core)
                run()  # the first run of a block wakes the thread pool: not counted
                for _ in range(block):
                    start = time.perf_counter()
                    run()
                    times[layout].append((time.perf_counter() - start) * 1000)
        for layout, values in times.items():
            result[layout][past] = float(np.median(values))
    return result


def _cached_step(model: runtime.Model, past: int, src_len: int, rng: np.random.Generator):
    """A call running the model's decoder graph once at `past` cached positions, batch 1."""
    manifest, graph = model.manifest, model.graphs.decoder
    states = {state.input_name: state for state in manifest.states}
    feeds = {}
    for name, spec in graph.inputs.items():
        if name == "input_ids":
            feeds[name] = np.full((1, 1), manifest.decoder_start_token_id, dtype=np.int64)
        elif name == "encoder_attention_mask":
            feeds[name] = np.ones((1, src_len), dtype=np.int64)
        elif name == "encoder_hidden_states":
            feeds[name] = rng.standard_normal((1, src_len, spec.shape[-1])).astype(spec.dtype)
        elif name == manifest.use_cache_branch:
            feeds[name] = np.array([True])
        else:
            state = states[name]
            length = past if state.kind == "grows" else src_len
            shape = [1 if axis == state.batch_axis else length if axis == state.seq_axis else dim
                     for axis, dim in enumerate(spec.shape)]
            feeds[name] = rng.standard_normal(shape).astype(spec.dtype)
    wanted = ["logits"] + [state.output_name for state in manifest.states if state.kind == "grows"]
    return lambda: graph.run(feeds, wanted)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--src-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--past", default="16,64", help="past lengths of the decoder step timing")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "s2s-bench")
    args = parser.parse_args()

    source = resolve("t5-small", args.cache_dir)
    dirs = prepare(source.checkpoint, args.cache_dir / "artefacts" / "cross-kv-layouts" / source.checkpoint.name)
    input_ids, _ = source.inputs(batch_size=1, src_len=args.src_len, seed=0)
    tokens, rounds = {}, {layout: [] for layout in LAYOUTS}
    for round_index in range(args.rounds):
        for layout in LAYOUTS:
            result, tokens[layout] = measure(dirs[layout], input_ids, args.new_tokens, args.threads, args.repeats)
            rounds[layout].append(result)
            print(json.dumps({"round": round_index, "layout": layout, **_rounded(result)}))
    for layout, results in rounds.items():
        # Each round's generate time over merged's in the same round: a ratio survives a neighbour's load
        # that moves both.
        ratios = [r["generate"] / m["generate"] for r, m in zip(results, rounds["merged"])]
        print(json.dumps({"median over rounds": layout, **_rounded({k: np.median([r[k] for r in results])
                                                                    for k in results[0]}),
                          "generate vs merged": round(float(np.median(ratios)), 3)}))
    same = all(np.array_equal(tokens[layout], tokens["merged"]) for layout in LAYOUTS)
    print(json.dumps({"same_tokens": same}))
    steps = step_times(dirs, [int(p) for p in args.past.split(",")], args.src_len, args.threads)
    for layout, by_past in steps.items():
        print(json.dumps({"layout": layout, "decoder step ms by past length": _rounded(by_past)}))


def _rounded(values: dict) -> dict:
    return {key: round(float(value), 2) for key, value in values.items()}

if __name__ == "__main__":
    main()
