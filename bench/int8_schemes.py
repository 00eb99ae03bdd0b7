"""Quantization schemes side by side: graph time per encoder call and decoder step, logits error, accuracy.

    python -m bench.int8_schemes [--variants NAME,...] [--graph decoder,encoder] [--rows 1,8,32]
                                 [--past 32] [--src-len 32] [--rounds 10] [--block 5] [--threads 2]
                                 [--clock wall|cpu] [--generate ROWSxBEAMS,...] [--new-tokens 64]
                                 [--no-timing] [--no-accuracy] [--out FILE.json]

On a shared machine use `--threads 1 --clock cpu`: the process's CPU time, which a busy neighbour
hardly moves (wall-clock medians moved 2x between rounds on this project's 2-core machine under load).

1. Timing: the random-weight t5-small shape (bench/shapes.py), exported fp32 once by `exporter.export`
   and quantized into one copy per variant (exporter/passes/quantize.py's `Scheme`s, plus a static
   QDQ S8S8 graph this script calibrates itself). Every variant's session is loaded at once and
   `session.run` is called on the same inputs, `block` calls per variant, the variants rotating
   order each round (so a neighbour's load falls on all of them alike); the table reports each
   variant's median and its median per-round ratio to fp32. Decoder step: 1 new token per row, a
   self-attention past of `past` positions, cross-attention K/V of `src_len` source positions, asking
   for the logits and the grown cache (what the runtime asks); encoder: `src_len` tokens per row.
   Sessions are made as the runtime makes them (runtime/sessions.py): `threads` intra-op threads,
   the encoder's pool not spinning. `--generate` adds whole `runtime.load(...).generate` calls
   (`new_tokens` forced, min = max), one per variant per round.
2. Logits error on the t5-small shape (a sanity figure only: random weights give near-flat logits):
   max |logits - fp32 logits| / max |fp32 logits| over 8 teacher-forced positions of 2 inputs.
3. Accuracy on the trained demo model (models/demo), on the 400 held-out instructions `make demo`
   uses: teacher-forced on their answers, the logits error, the mean KL of the next-token
   distributions and the top-1 agreement with fp32; then exact match, greedy and beam 4, by the s2s
   runtime on each variant's export, and how many answers are identical to fp32's.

Exports are cached under --cache-dir (default ~/.cache/s2s-bench/artefacts/int8-schemes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from bench.sources import DEMO_DIR, resolve
from exporter.passes import quantize as quantize_module
from exporter.passes.quantize import Scheme, cpu_flags, cpu_level, quantize_graphs
from runtime.manifest import Manifest

# An onnxruntime thread pool keeps spinning for a while after a run (DESIGN.md: tens of ms).
_POOL_IDLE_S = 0.05


@dataclass(frozen=True)
class Variant:
    name: str
    scheme: Scheme | None  # None: fp32 (when not qdq)
    qdq: bool = False  # static QDQ S8S8 (calibrated here) instead of a Scheme
    session_config: tuple[tuple[str, str], ...] = ()  # extra onnxruntime session config entries
    graphs_of: str | None = None  # same graphs as this variant (a session-setting variant)


_DYNAMIC = Scheme(method="dynamic", bits=8, vocab_projection=False)  # the pass before issue 10
_NBITS = Scheme(method="matmul_nbits", bits=4, block_size=32, accuracy_level=4)
VARIANTS = (
    Variant("fp32", None),
    Variant("s8 per-tensor", _DYNAMIC),
    Variant("s8 per-channel", replace(_DYNAMIC, per_channel=True)),
    Variant("u8 per-tensor", replace(_DYNAMIC, weight_type="uint8")),
    Variant("u8 per-channel", replace(_DYNAMIC, weight_type="uint8", per_channel=True)),
    Variant("s8 per-tensor reduce_range", replace(_DYNAMIC, reduce_range=True)),
    Variant("s8 per-channel reduce_range", replace(_DYNAMIC, per_channel=True, reduce_range=True)),
    Variant("s8 per-tensor +vocab", replace(_DYNAMIC, vocab_projection=True)),
    Variant("s8 per-channel +vocab", replace(_DYNAMIC, per_channel=True, vocab_projection=True)),
    Variant("u8 per-tensor +vocab", replace(_DYNAMIC, weight_type="uint8", vocab_projection=True)),
    Variant("s8 per-tensor +vocab reduce_range", replace(_DYNAMIC, vocab_projection=True, reduce_range=True)),
    Variant("s8 per-tensor +vocab +attention", replace(_DYNAMIC, vocab_projection=True, attention=True)),
    Variant("s8 per-tensor +vocab +dynamic_block_base=4", None, session_config=(("session.dynamic_block_base", "4"),),
            graphs_of="s8 per-tensor +vocab"),
    Variant("s8 per-tensor +vocab +x64quantprecision=1", None, session_config=(("session.x64quantprecision", "1"),),
            graphs_of="s8 per-tensor +vocab"),
    Variant("qdq s8s8 static +vocab", None, qdq=True),
    Variant("nbits4 b32 acc4 +vocab", _NBITS),
    Variant("nbits4 b64 acc4 +vocab", replace(_NBITS, block_size=64)),
    Variant("nbits4 b128 acc4 +vocab", replace(_NBITS, block_size=128)),
    Variant("nbits4 b32 acc0 +vocab", replace(_NBITS, accuracy_level=0)),
    Variant("nbits4 b32 acc4", replace(_NBITS, vocab_projection=False)),
    Variant("nbits8 b32 acc4 +vocab", replace(_NBITS, bits=8)),
    Variant("nbits8 b128 acc4 +vocab", replace(_NBITS, bits=8, block_size=128)),
)
BY_NAME = {variant.name: variant for variant in VARIANTS}


# ---- building the variants' export directories ----------------------------------------------------------

def fp32_export(checkpoint: Path, work_dir: Path) -> Path:
    """work_dir/fp32: `checkpoint` exported by s2s-export's API, fp32, unvalidated (built once)."""
    target = work_dir / "fp32"
    if not (target / "s2s.json").is_file():
        from exporter import export

        shutil.rmtree(target, ignore_errors=True)
        # The Concat cache layout (no kv-buffer pass), whose decoder feeds are plain arrays: the schemes
        # differ in the MatMuls with weights, which that pass leaves as they are.
        export(checkpoint, target, validate=False, kv_buffer=False)
    return target


def variant_dir(fp32_dir: Path, work_dir: Path, variant: Variant, calibration: Callable[[], dict] | None) -> Path:
    """The export directory of `variant` (built once from fp32_dir): quantized graphs, manifest updated."""
    if variant.graphs_of is not None:
        return variant_dir(fp32_dir, work_dir, BY_NAME[variant.graphs_of], calibration)
    if variant.scheme is None and not variant.qdq:
        return fp32_dir
    # Keyed by the variant and the quantization code, so that a changed pass is never served a stale build.
    key = hashlib.sha256(repr(variant).encode() + Path(quantize_module.__file__).read_bytes()).hexdigest()[:10]
    target = work_dir / f"{'-'.join(variant.name.replace(',', '').split())}-{key}"
    if (target / "s2s.json").is_file():
        return target
    shutil.rmtree(target, ignore_errors=True)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(fp32_dir, staging)
    manifest = Manifest.read(staging)
    graphs = [staging / manifest.encoder_file, staging / manifest.decoder_file]
    if variant.qdq:
        _quantize_qdq(graphs, calibration())
        manifest = replace(manifest, precision="int8", passes=(*manifest.passes, "int8-qdq-static"))
    else:
        scheme = quantize_graphs(graphs, variant.scheme)
        precision = "int4" if scheme.bits == 4 else "int8"
        manifest = replace(manifest, precision=precision, quantization=scheme.record(),
                           passes=(*manifest.passes, f"{precision}-{scheme.method}"))
    manifest.write(staging)
    staging.rename(target)
    return target


def calibration_feeds(export_dir: Path, input_ids: np.ndarray, attention_mask: np.ndarray,
                      decoder_input_ids: np.ndarray) -> dict[str, list[dict[str, np.ndarray]]]:
    """Every graph's feeds, by file, as fp32 graphs see them on these inputs ([batch, len] int64),
    teacher-forced on decoder_input_ids: the calibration data of the static QDQ variant."""
    from exporter.graph_runner import GraphRunner

    feeds: dict[str, list[dict[str, np.ndarray]]] = {}
    runner = GraphRunner(export_dir, Manifest.read(export_dir),
                         on_run=lambda file, f: feeds.setdefault(file, []).append(dict(f)))
    encoded = runner.encode(input_ids, attention_mask)
    runner.decode(encoded, attention_mask, decoder_input_ids)
    return feeds


def _quantize_qdq(graphs: list[Path], feeds: dict[str, list[dict[str, np.ndarray]]]) -> None:
    """Static QDQ S8S8 (int8 weights per tensor and int8 activations, MinMax-calibrated scales), with
    the output projection untied as Scheme(vocab_projection=True) does."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from exporter.passes.quantize import _untie_output_projection

    class Reader(CalibrationDataReader):
        def __init__(self, items: list[dict[str, np.ndarray]]):
            self.items = iter(items)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    for path in graphs:
        _untie_output_projection(path)
        staged = path.with_name(path.name + ".qdq")
        quantize_static(path, staged, Reader(feeds[path.name]), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["MatMul"], activation_type=QuantType.QInt8,
                        weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT,
                                                                     "ActivationSymmetric": True})
        staged.replace(path)


# ---- timing ---------------------------------------------------------------------------------------------

def _session(path: Path, threads: int, spinning: bool, config: tuple[tuple[str, str], ...]):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key, value in config:
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(session, manifest: Manifest, graph: str, rows: int, past: int, src_len: int,
           rng: np.random.Generator) -> tuple[dict[str, np.ndarray], list[str]]:
    """Seeded inputs of one encoder call or one cached decoder step, and the outputs to ask for."""
    if graph == "encoder":
        ids = rng.integers(2, manifest.vocab_size, (rows, src_len), dtype=np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids)}, [o.name for o in session.get_outputs()]
    states = {s.input_name: s for s in manifest.states}
    feeds = {}
    for arg in session.get_inputs():
        if arg.name == "input_ids":
            feeds[arg.name] = rng.integers(2, manifest.vocab_size, (rows, 1), dtype=np.int64)
        elif arg.name == "encoder_attention_mask":
            feeds[arg.name] = np.ones((rows, src_len), dtype=np.int64)
        else:
            state = states[arg.name]
            length = past if state.kind == "grows" else src_len
            shape = [rows if axis == state.batch_axis else length if axis == state.seq_axis else dim
                     for axis, dim in enumerate(arg.shape)]
            feeds[arg.name] = rng.standard_normal(shape).astype(np.float32)
    wanted = ["logits"] + [s.output_name for s in manifest.states if s.kind == "grows"]
    return feeds, wanted


def time_graph(dirs: dict[str, Path], graph: str, rows_list: list[int], *, past: int, src_len: int, threads: int,
               rounds: int, block: int, clock: str) -> dict[int, dict[str, dict[str, float]]]:
    """Per rows, per variant: median ms, p25/p75 ms, and the median per-round ratio fp32 / variant.

    clock "wall": elapsed time; "cpu": the process's CPU time (time.process_time), which a busy
    neighbour hardly moves: with threads=1 it is the work of the run alone (no pool, no spinning).
    """
    now = time.perf_counter if clock == "wall" else time.process_time
    manifest = Manifest.read(dirs["fp32"])
    file = manifest.encoder_file if graph == "encoder" else manifest.decoder_file
    sessions = {name: _session(d / file, threads, spinning=graph != "encoder", config=BY_NAME[name].session_config)
                for name, d in dirs.items()}
    result = {}
    for rows in rows_list:
        feeds, wanted = _feeds(sessions["fp32"], manifest, graph, rows, past, src_len, np.random.default_rng(rows))
        times: dict[str, list[list[float]]] = {name: [] for name in sessions}
        for round_index in range(rounds):
            order = list(sessions)
            random.Random(round_index).shuffle(order)
            for name in order:
                time.sleep(_POOL_IDLE_S)  # the previous variant's pool stops spinning
                sessions[name].run(wanted, feeds)  # wakes the pool: not counted
                calls = []
                for _ in range(block):
                    start = now()
                    sessions[name].run(wanted, feeds)
                    calls.append((now() - start) * 1000)
                times[name].append(calls)
        result[rows] = {}
        for name, per_round in times.items():
            flat = [t for calls in per_round for t in calls]
            speedup = [np.median(f) / np.median(c) for f, c in zip(times["fp32"], per_round)]
            result[rows][name] = {"median_ms": float(np.median(flat)), "p25_ms": float(np.percentile(flat, 25)),
                                  "p75_ms": float(np.percentile(flat, 75)), "speedup": float(np.median(speedup))}
        print(json.dumps({"graph": graph, "rows": rows,
                          **{n: round(v["median_ms"], 2) for n, v in result[rows].items()}}), flush=True)
    return result


def time_generate(dirs: dict[str, Path], *, rows: int, num_beams: int, new_tokens: int, src_len: int, threads: int,
                  rounds: int, clock: str, inputs_of: Callable[[int, int], tuple[np.ndarray, np.ndarray]]
                  ) -> dict[str, dict[str, float]]:
    """Whole `runtime.load(...).generate` calls, `new_tokens` forced (min = max), one call per variant per
    round in rotating order: median ms and the median per-round ratio fp32 / variant."""
    import runtime

    now = time.perf_counter if clock == "wall" else time.process_time
    models = {name: runtime.load(d, provider="cpu", threads=threads) for name, d in dirs.items()}
    input_ids, attention_mask = inputs_of(rows, src_len)
    options = dict(num_beams=num_beams, min_new_tokens=new_tokens, max_new_tokens=new_tokens)
    for model in models.values():
        model.generate(input_ids, attention_mask, **options)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in models}
    for round_index in range(rounds):
        order = list(models)
        random.Random(round_index).shuffle(order)
        for name in order:
            time.sleep(_POOL_IDLE_S)
            start = now()
            models[name].generate(input_ids, attention_mask, **options)
            times[name].append((now() - start) * 1000)
    result = {name: {"median_ms": float(np.median(t)), "p25_ms": float(np.percentile(t, 25)),
                     "p75_ms": float(np.percentile(t, 75)),
                     "speedup": float(np.median(np.array(times["fp32"]) / np.array(t)))} for name, t in times.items()}
    print(json.dumps({"generate": f"rows {rows}, beams {num_beams}", **{n: round(v["median_ms"], 1)
                                                                        for n, v in result.items()}}), flush=True)
    return result


# ---- logits error and accuracy --------------------------------------------------------------------------

def logits_error(dirs: dict[str, Path], input_ids: np.ndarray, attention_mask: np.ndarray,
                 decoder_input_ids: np.ndarray) -> dict[str, float]:
    """max |logits - fp32 logits| / max |fp32 logits| per variant, teacher-forced ([batch, len] int64 inputs)."""
    from exporter.graph_runner import GraphRunner

    def logits(export_dir: Path) -> np.ndarray:
        runner = GraphRunner(export_dir, Manifest.read(export_dir))
        return runner.decode(runner.encode(input_ids, attention_mask), attention_mask, decoder_input_ids)

    reference = logits(dirs["fp32"])
    return {name: float(np.abs(logits(d) - reference).max() / np.abs(reference).max()) for name, d in dirs.items()}


def demo_accuracy(dirs: dict[str, Path], threads: int) -> dict[str, dict[str, float]]:
    """Exact match on the held-out instructions of `make demo`, greedy and beam 4, per variant."""
    import runtime
    from demo import HELD_OUT_PER_TASK, NUM_BEAMS
    from models.evaluate import exact_match
    from models.tasks import held_out_examples

    held_out = held_out_examples(HELD_OUT_PER_TASK)
    sources, targets = [s for s, _ in held_out], [t for _, t in held_out]
    teacher_forced = _teacher_forced(dirs["fp32"], held_out)
    result, answers = {}, {}
    for name, export_dir in dirs.items():
        model = runtime.load(export_dir, provider="cpu", threads=threads)
        result[name] = _logits_drift(dirs["fp32"], export_dir, *teacher_forced)
        for beams in (1, NUM_BEAMS):
            search = f"beam {beams}" if beams > 1 else "greedy"
            answers[name, search] = model.generate_text(sources, num_beams=beams)
            result[name][search] = exact_match(answers[name, search], targets)
            # More telling than exact match when both are near 100%: how many answers changed at all.
            result[name][f"{search} same as fp32"] = exact_match(answers[name, search], answers["fp32", search])
        print(json.dumps({"accuracy": name, **result[name]}), flush=True)
    return result


def _teacher_forced(export_dir: Path, examples: list[tuple[str, str]]
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, attention_mask [rows, src_len], decoder_input_ids and its mask [rows, tgt_len] (int64) of
    (instruction, answer) pairs: the decoder fed the start token and the answer, as in training."""
    from tokenizers import Tokenizer

    from models.evaluate import encode_sources

    manifest = Manifest.read(export_dir)
    tokenizer = Tokenizer.from_file(str(export_dir / manifest.tokenizer_file))
    input_ids, attention_mask = encode_sources(tokenizer, [s for s, _ in examples])
    answers, answer_mask = encode_sources(tokenizer, [t for _, t in examples])
    start = np.full((len(examples), 1), manifest.decoder_start_token_id, dtype=np.int64)
    return input_ids, attention_mask, np.concatenate([start, answers[:, :-1]], axis=1), answer_mask


def _logits_drift(fp32_dir: Path, export_dir: Path, input_ids: np.ndarray, attention_mask: np.ndarray,
                  decoder_input_ids: np.ndarray, decoder_mask: np.ndarray) -> dict[str, float]:
    """Over the answer positions (decoder_mask, [rows, tgt_len]): max |logits - fp32| / max |fp32|, the
    mean KL(fp32 || variant) of the next-token distributions, and how often the top token is the same."""
    from exporter.graph_runner import GraphRunner

    def log_probs(directory: Path) -> tuple[np.ndarray, np.ndarray]:
        runner = GraphRunner(directory, Manifest.read(directory))
        logits = runner.decode(runner.encode(input_ids, attention_mask), attention_mask, decoder_input_ids)
        logits = logits[decoder_mask.astype(bool)]  # [positions, vocab]
        shifted = logits - logits.max(axis=-1, keepdims=True)
        return logits, shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))

    reference, reference_lp = log_probs(fp32_dir)
    logits, lp = log_probs(export_dir)
    return {"logits error": float(np.abs(logits - reference).max() / np.abs(reference).max()),
            "mean KL": float((np.exp(reference_lp) * (reference_lp - lp)).sum(axis=-1).mean()),
            "top-1 agreement": float((logits.argmax(-1) == reference.argmax(-1)).mean())}


def _demo_calibration(fp32_dir: Path) -> dict:
    """Training-distribution instructions (never the held-out ones), teacher-forced on their answers."""
    from demo import HELD_OUT_PER_TASK
    from models.tasks import held_out_examples, training_batches

    exclude = {s for s, _ in held_out_examples(HELD_OUT_PER_TASK)}
    return calibration_feeds(fp32_dir, *_teacher_forced(fp32_dir, next(training_batches(16, exclude, seed=7)))[:3])


# ---- report ---------------------------------------------------------------------------------------------

def markdown(results: dict) -> str:
    """The note's tables: ms (x fp32) per graph and rows, per generate case; then logits error and accuracy."""
    def timed(cell: dict, digits: int) -> str:
        return (f"{cell['median_ms']:.{digits}f} (x{cell['speedup']:.2f}; "
                f"{cell['p25_ms']:.{digits - 1}f}-{cell['p75_ms']:.{digits - 1}f})")

    lines = []
    for graph, by_rows in results.get("timing", {}).items():
        rows_list = list(by_rows)
        what = f"per step, past {results['past']}" if graph == "decoder" else "per call"
        lines += [f"\n{graph} ({what}), median ms (speed-up vs fp32, median of per-round ratios; p25-p75):\n",
                  "| variant | " + " | ".join(f"{r} row{'s' if int(r) > 1 else ''}" for r in rows_list) + " |",
                  "|---|" + "---|" * len(rows_list)]
        lines += [f"| {name} | " + " | ".join(timed(by_rows[r][name], 2) for r in rows_list) + " |"
                  for name in by_rows[rows_list[0]]]
    for case, by_variant in results.get("generate", {}).items():
        rows, beams = case.split("x")
        search = "greedy" if beams == "1" else f"beam {beams}"
        lines += [f"\ngenerate, {rows} row(s), {search}, {results['new_tokens']} new tokens: "
                  "median ms (speed-up vs fp32; p25-p75)\n", "| variant | ms |", "|---|---|"]
        lines += [f"| {name} | {timed(cell, 1)} |" for name, cell in by_variant.items()]
    if "logits_error" in results or "accuracy" in results:
        columns = ("logits error", "mean KL", "top-1 agreement", "greedy", "beam 4", "greedy same as fp32",
                   "beam 4 same as fp32")
        lines += ["\n| variant | t5-small logits error | " + " | ".join(f"demo {c}" for c in columns) + " |",
                  "|---|---|" + "---|" * len(columns)]
        for name in results.get("logits_error") or results["accuracy"]:
            error = results.get("logits_error", {}).get(name)
            accuracy = results.get("accuracy", {}).get(name, {})
            cells = [f"{accuracy[c]:.1e}" if c == "mean KL" else f"{accuracy[c]:.2%}" if c in accuracy else ""
                     for c in columns]
            lines.append(f"| {name} | {'' if error is None else f'{error:.2%}'} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default=",".join(BY_NAME), help="comma-separated names (fp32 always runs)")
    parser.add_argument("--graph", default="decoder,encoder")
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--past", type=int, default=32)
    parser.add_argument("--src-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--block", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: the process's CPU time, for a busy machine (with --threads 1)")
    parser.add_argument("--generate", default="", help="also time whole generate calls: ROWSxBEAMS,... (e.g. 1x1,8x4)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "s2s-bench")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()

    names = ["fp32"] + [n for n in args.variants.split(",") if n and n != "fp32"]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {list(BY_NAME)}")
    work = args.cache_dir / "artefacts" / "int8-schemes"
    results: dict = {"cpu": cpu_level(cpu_flags()), "threads": args.threads, "clock": args.clock, "past": args.past,
                     "new_tokens": args.new_tokens,
                     "variants": names}

    source = resolve("t5-small", args.cache_dir)
    t5_work = work / source.checkpoint.name
    t5_fp32 = fp32_export(source.checkpoint, t5_work)
    inputs = source.inputs(batch_size=2, src_len=args.src_len, seed=0)
    decoder_ids = np.random.default_rng(1).integers(2, source.vocab_size, (2, 8), dtype=np.int64)
    decoder_ids[:, 0] = source.decoder_start_token_id
    t5_dirs = {n: variant_dir(t5_fp32, t5_work, BY_NAME[n], lambda: calibration_feeds(t5_fp32, *inputs, decoder_ids))
               for n in names}
    if not args.no_timing:
        results["timing"] = {graph: time_graph(t5_dirs, graph, [int(r) for r in args.rows.split(",")], past=args.past,
                                               src_len=args.src_len, threads=args.threads, rounds=args.rounds,
                                               block=args.block, clock=args.clock)
                             for graph in args.graph.split(",")}
    if args.generate:
        results["generate"] = {
            case: time_generate(t5_dirs, rows=int(case.split("x")[0]), num_beams=int(case.split("x")[1]),
                                new_tokens=args.new_tokens, src_len=args.src_len, threads=args.threads,
                                rounds=args.rounds, clock=args.clock,
                                inputs_of=lambda rows, src_len: source.inputs(rows, src_len, seed=0))
            for case in args.generate.split(",")}
    if not args.no_accuracy:
        graph_variants = [n for n in names if BY_NAME[n].graphs_of is None]  # session settings: same numbers
        results["logits_error"] = logits_error({n: t5_dirs[n] for n in graph_variants}, *inputs, decoder_ids)
        demo_work = work / "demo"
        demo_fp32 = fp32_export(DEMO_DIR, demo_work)
        demo_dirs = {n: variant_dir(demo_fp32, demo_work, BY_NAME[n], lambda: _demo_calibration(demo_fp32))
                     for n in graph_variants}
        results["accuracy"] = demo_accuracy(demo_dirs, args.threads)
    print(markdown(results))
    if args.out is not None:
        args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
