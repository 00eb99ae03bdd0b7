"""Small onnxruntime measurements behind issue 10's levers that were not built (bench/README.md).

    python -m bench.ort_probes kv-dtype [--threads 2] [--rows 4] [--layers 6]
    python -m bench.ort_probes unasked-outputs [--rows 4]
    python -m bench.ort_probes pair EXPORT_A EXPORT_B [--num-beams 1] [--batch-size 1] [--rounds 11]
    python -m bench.ort_probes arena EXPORT [--num-beams 1] [--batch-size 1] [--rounds 2]
    python -m bench.ort_probes rss EXPORT [EXPORT ...] [--num-beams 1] [--batch-size 1] [--rounds 2]
    python -m bench.ort_probes checkouts OLD_TREE NEW_TREE EXPORT [--num-beams 1] [--batch-size 1] [--rounds 20]
    python -m bench.ort_probes int8-cache [--threads 2]
    python -m bench.ort_probes attention-kernels EXPORT [--num-beams 1] [--rounds 9] [--threads 2]

- kv-dtype: the self-attention cache in float16 instead of float32 (halving the bytes a step reads at
  long pasts): `layers` GroupQueryAttention nodes over in-place buffers (the kv-buffer layout, t5-small's
  8 heads of 64), queries cast to float16 and the output back, timed at past 16 and 512 against the
  float32 graph.
- unasked-outputs: whether onnxruntime skips nodes whose outputs a run does not ask for (it would make
  a log-softmax + top-k head in the decoder free for greedy search): a graph with an Identity output
  and a LogSoftmax + TopK branch over [rows, 1, 32128] logits, run asking for the Identity alone, then both.
- pair: two export directories (say, with and without `s2s-export --optimize`) loaded in one process,
  generate calls alternating, the order flipping each round; the median of per-round time ratios A/B.
- arena: one export directory with onnxruntime's CPU memory arena on and off, each in its own process
  (alternating), peak RSS over the timed calls (after one warm-up, as s2s-bench measures it) and the
  median call time.
- rss: export directories (say, one exported before the shared-weights pass and one after), each
  loaded in its own process, alternating: peak RSS over the timed calls, measured as `arena` does.
- checkouts: two checkouts of this repository (say, `git worktree add /tmp/old REV` and this one), each
  in its own process with the same export directory, generate calls alternating call by call, the order
  flipping each round; the median of per-round time ratios OLD/NEW, and whether both returned the same
  tokens. How a runtime change is timed on this noisy machine.
- int8-cache: one GroupQueryAttention layer (t5-small's 8 heads of 64, in-place buffers) with a float32
  cache against an int8 cache (`k_quant_type`/`v_quant_type` PER_TENSOR, static scales), at past 16
  and 512: what an int8 self-attention cache would save an int8 step at long pasts.
- attention-kernels: a kv-buffer export's decoder as exported (GroupQueryAttention), with every layer's
  GroupQueryAttention replaced by DecoderMaskedMultiHeadAttention (same buffers, written in place; the
  past length from total_sequence_length), and with GroupQueryAttention over an int8 cache
  (PER_TENSOR, one static scale of 0.05: for timing only, its tokens are not meant to match), in
  copies of the export under a temporary directory. All variants loaded in one process; each round
  one call of each (532 new tokens, min = max), the order rotating; per call the step cost at past 512
  over past 16, whole step and inside session.run (bench/step_cost.py's windows); the medians over
  calls, and whether each variant's tokens equal the exported graph's.
Every generate call asks for exactly 64 new tokens (min = max) from 32 random source tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

HEADS, HEAD_SIZE, VOCAB = 8, 64, 32128
NEW_TOKENS, SRC_LEN = 64, 32


def _median_us(run: Callable[[], Any], calls: int = 50, warmup: int = 10) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e6


def _session(model: bytes, threads: int) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _gqa_graph(dtype: int, rows: int, layers: int, capacity: int) -> bytes:
    from onnx import TensorProto, helper

    width = HEADS * HEAD_SIZE
    inputs = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [rows, 1, width]) for name in "qkv"]
    inputs += [helper.make_tensor_value_info(f"{kind}{layer}", dtype, [rows, HEADS, capacity, HEAD_SIZE])
               for layer in range(layers) for kind in ("past_key", "past_value")]
    inputs += [helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [rows]),
               helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, [])]
    nodes, outputs = [], []
    suffix = ""
    if dtype == TensorProto.FLOAT16:
        nodes += [helper.make_node("Cast", [name], [f"{name}16"], to=dtype) for name in "qkv"]
        suffix = "16"
    query = f"q{suffix}"
    for layer in range(layers):
        nodes.append(helper.make_node(
            "GroupQueryAttention", [query, f"k{suffix}", f"v{suffix}", f"past_key{layer}", f"past_value{layer}",
                                    "seqlens_k", "total_sequence_length"],
            [f"attention{layer}", f"present_key{layer}", f"present_value{layer}"],
            domain="com.microsoft", num_heads=HEADS, kv_num_heads=HEADS))
        query = f"attention{layer}"
        outputs += [helper.make_tensor_value_info(f"present_{kind}{layer}", dtype, None) for kind in ("key", "value")]
    nodes.append(helper.make_node("Cast", [query], ["out"], to=TensorProto.FLOAT))
    outputs.append(helper.make_tensor_value_info("out", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "gqa_layers", inputs, outputs)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=8).SerializeToString()


def kv_dtype(threads: int, rows: int, layers: int) -> list[dict[str, Any]]:
    import onnxruntime as ort
    from onnx import TensorProto

    capacity = 576
    rng = np.random.default_rng(0)
    found = []
    for name, dtype, np_dtype in (("float32", TensorProto.FLOAT, np.float32),
                                  ("float16", TensorProto.FLOAT16, np.float16)):
        session = _session(_gqa_graph(dtype, rows, layers, capacity), threads)
        buffers = {f"{kind}{layer}": ort.OrtValue.ortvalue_from_numpy(
            (rng.standard_normal((rows, HEADS, capacity, HEAD_SIZE)) * 0.1).astype(np_dtype))
            for layer in range(layers) for kind in ("past_key", "past_value")}
        for past in (16, 512):
            binding = session.io_binding()
            for q in "qkv":
                binding.bind_cpu_input(q, rng.standard_normal((rows, 1, HEADS * HEAD_SIZE)).astype(np.float32))
            for buffer_name, value in buffers.items():
                binding.bind_ortvalue_input(buffer_name, value)  # written in place, as the decoder does
                binding.bind_ortvalue_output(buffer_name.replace("past_", "present_"), value)
            binding.bind_cpu_input("seqlens_k", np.full(rows, past, dtype=np.int32))
            binding.bind_cpu_input("total_sequence_length", np.array(past + 1, dtype=np.int32))
            binding.bind_output("out", "cpu")
            found.append({"cache": name, "past": past,
                          "us": _median_us(lambda b=binding, s=session: s.run_with_iobinding(b))})
    return found


def unasked_outputs(rows: int) -> list[dict[str, Any]]:
    from onnx import TensorProto, helper

    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, [rows, 1, VOCAB])
    k = helper.make_tensor_value_info("k", TensorProto.INT64, [1])
    nodes = [helper.make_node("Identity", ["logits"], ["same"]),
             helper.make_node("LogSoftmax", ["logits"], ["log_probs"], axis=-1),
             helper.make_node("TopK", ["log_probs", "k"], ["values", "indices"], axis=-1)]
    outputs = [helper.make_tensor_value_info("same", TensorProto.FLOAT, None),
               helper.make_tensor_value_info("values", TensorProto.FLOAT, None),
               helper.make_tensor_value_info("indices", TensorProto.INT64, None)]
    graph = helper.make_graph(nodes, "unasked", [logits, k], outputs)
    session = _session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                                         ir_version=8).SerializeToString(), 1)
    feeds = {"logits": np.random.default_rng(0).standard_normal((rows, 1, VOCAB)).astype(np.float32),
             "k": np.array([9], dtype=np.int64)}
    return [{"asked": asked, "us": _median_us(lambda a=asked: session.run(a, feeds), calls=200)}
            for asked in (["same"], ["same", "values", "indices"], ["same"])]


def _inputs(batch: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.random.default_rng(0).integers(5, 30000, size=(batch, SRC_LEN)).astype(np.int64)
    return ids, np.ones_like(ids)


def pair(a: str, b: str, num_beams: int, batch: int, rounds: int, threads: int) -> dict[str, Any]:
    import runtime

    models = [runtime.load(path, provider="cpu", threads=threads) for path in (a, b)]
    ids, mask = _inputs(batch)

    def call(model: Any) -> float:
        start = time.perf_counter()
        model.generate(ids, mask, num_beams=num_beams, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        return time.perf_counter() - start

    for model in models:
        call(model)
    times: dict[int, list[float]] = {0: [], 1: []}
    for i in range(rounds):
        for index in (0, 1) if i % 2 == 0 else (1, 0):
            times[index].append(call(models[index]))
    ratios = np.array(times[0]) / np.array(times[1])
    return {"a_ms": float(np.median(times[0])) * 1e3, "b_ms": float(np.median(times[1])) * 1e3,
            "a_over_b": float(np.median(ratios)), "p10": float(np.percentile(ratios, 10)),
            "p90": float(np.percentile(ratios, 90))}


def _arena_child(path: str, arena: bool, num_beams: int, batch: int, threads: int) -> dict[str, Any]:
    import onnxruntime as ort

    import runtime
    from bench import measure

    if not arena:  # every session the runtime creates, without the arena
        original = ort.InferenceSession.__init__

        def without_arena(self: Any, model: Any, options: Any = None, *args: Any, **kwargs: Any) -> None:
            if options is not None:
                options.enable_cpu_mem_arena = False
            original(self, model, options, *args, **kwargs)

        ort.InferenceSession.__init__ = without_arena  # type: ignore[method-assign]
    model = runtime.load(path, provider="cpu", threads=threads)
    ids, mask = _inputs(batch)
    options = dict(num_beams=num_beams, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    model.generate(ids, mask, **options)
    measure.reset_peak_rss()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        model.generate(ids, mask, **options)
        times.append(time.perf_counter() - start)
    return {"arena": arena, "peak_rss_mb": measure.peak_rss_mb(), "ms": float(np.median(times)) * 1e3}


def arena(paths: list[str], num_beams: int, batch: int, rounds: int, threads: int, *,
          arena_off: bool = True) -> list[dict[str, Any]]:
    """Each path with the arena on (and off, with arena_off), one process each, alternating."""
    found = []
    for _ in range(rounds):
        for path in paths:
            for on in (True, False) if arena_off else (True,):
                command = [sys.executable, "-m", "bench.ort_probes", "_arena-child", path, str(int(on)),
                           str(num_beams), str(batch), str(threads)]
                result = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)
                found.append(dict(result, export=path))
    return found


_CHECKOUT_CHILD = """
import sys, time, numpy as np, runtime
path = sys.argv[1]
beams, batch, threads, new, src = (int(value) for value in sys.argv[2:7])
model = runtime.load(path, provider="cpu", threads=threads)
ids = np.random.default_rng(0).integers(5, 30000, size=(batch, src)).astype(np.int64)
call = lambda: model.generate(ids, np.ones_like(ids), num_beams=beams, max_new_tokens=new, min_new_tokens=new)
call()
print("ready", flush=True)
for _ in sys.stdin:
    start = time.perf_counter(); out = call(); ms = (time.perf_counter() - start) * 1e3
    print(ms, int(out.sum()), flush=True)
"""


def checkouts(old: str, new: str, path: str, num_beams: int, batch: int, rounds: int, threads: int) -> dict[str, Any]:
    import os

    def start(tree: str) -> subprocess.Popen:
        child = subprocess.Popen([sys.executable, "-c", _CHECKOUT_CHILD, path, str(num_beams), str(batch), str(threads),
                                  str(NEW_TOKENS), str(SRC_LEN)], cwd=tree, env=dict(os.environ, PYTHONPATH=tree),
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline().strip() == "ready", f"{tree} did not start"
        return child

    children = [start(old), start(new)]
    times: list[list[float]] = [[], []]
    sums: list[set[str]] = [set(), set()]
    try:
        for i in range(rounds):
            for index in (0, 1) if i % 2 == 0 else (1, 0):
                child = children[index]
                assert child.stdin is not None and child.stdout is not None
                child.stdin.write("go\n")
                child.stdin.flush()
                ms, total = child.stdout.readline().split()
                times[index].append(float(ms))
                sums[index].add(total)
    finally:
        for child in children:
            if child.stdin is not None:
                child.stdin.close()
            child.wait(timeout=60)
    ratios = np.array(times[0]) / np.array(times[1])
    return {"old_ms": float(np.median(times[0])), "new_ms": float(np.median(times[1])),
            "old_over_new": float(np.median(ratios)), "p10": float(np.percentile(ratios, 10)),
            "p90": float(np.percentile(ratios, 90)), "same_tokens": sums[0] == sums[1]}


def int8_cache(threads: int, capacity: int = 520) -> list[dict[str, Any]]:
    from onnx import TensorProto, helper

    found = []
    for name, cache_type, dtype in (("float32", TensorProto.FLOAT, np.float32), ("int8", TensorProto.INT8, np.int8)):
        width = HEADS * HEAD_SIZE
        inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 1, width]) for n in ("q", "k", "v")]
        inputs += [helper.make_tensor_value_info(n, cache_type, [1, HEADS, capacity, HEAD_SIZE])
                   for n in ("past_k", "past_v")]
        inputs += [helper.make_tensor_value_info(n, TensorProto.INT32, [1]) for n in ("seqlens_k", "total")]
        names = ["q", "k", "v", "past_k", "past_v", "seqlens_k", "total"]
        attributes: dict[str, Any] = dict(num_heads=HEADS, kv_num_heads=HEADS, domain="com.microsoft")
        if name == "int8":
            inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("k_scale", "v_scale")]
            names += [""] * 5 + ["k_scale", "v_scale"]
            attributes.update(k_quant_type="PER_TENSOR", v_quant_type="PER_TENSOR", kv_cache_bit_width=8)
        node = helper.make_node("GroupQueryAttention", names, ["out", "present_k", "present_v"], **attributes)
        outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)]
        outputs += [helper.make_tensor_value_info(n, cache_type, None) for n in ("present_k", "present_v")]
        model = helper.make_model(helper.make_graph([node], "cache", inputs, outputs), ir_version=9,
                                  opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
        session = _session(model.SerializeToString(), threads)
        import onnxruntime as ort

        rng = np.random.default_rng(0)
        caches = [ort.OrtValue.ortvalue_from_numpy(np.zeros((1, HEADS, capacity, HEAD_SIZE), dtype=dtype))
                  for _ in range(2)]
        for past in (16, 512):
            binding = session.io_binding()
            feeds = {n: rng.standard_normal((1, 1, width)).astype(np.float32) for n in ("q", "k", "v")}
            feeds.update(seqlens_k=np.array([past], np.int32), total=np.array([past + 1], np.int32))
            if name == "int8":
                feeds.update(k_scale=np.array([0.05], np.float32), v_scale=np.array([0.05], np.float32))
            for n, value in feeds.items():
                binding.bind_cpu_input(n, value)
            for n, cache in zip(("past_k", "past_v"), caches):
                binding.bind_ortvalue_input(n, cache)
            for n, cache in zip(("present_k", "present_v"), caches):
                binding.bind_ortvalue_output(n, cache)
            binding.bind_output("out")
            found.append({"cache": name, "past": past,
                          "us": _median_us(lambda b=binding, s=session: s.run_with_iobinding(b), calls=200)})
    return found


def _attention_variant(export: Path, out: Path, kind: str) -> Path:
    """A copy of `export` whose decoder attends with `kind` ("dmmha" or "int8-cache"); see the docstring."""
    import shutil

    import onnx
    from onnx import TensorProto, helper, numpy_helper

    shutil.copytree(export, out)
    model = onnx.load(str(out / "decoder.onnx"), load_external_data=False)  # weights stay where they are
    graph = model.graph
    nodes, buffers = [], set()
    if kind == "dmmha":
        graph.initializer.extend([numpy_helper.from_array(np.array(1, np.int32), "probe/one"),
                                  numpy_helper.from_array(np.array([1], np.int64), "probe/shape")])
        nodes += [helper.make_node("Sub", ["total_sequence_length", "probe/one"], ["probe/past0"]),
                  helper.make_node("Reshape", ["probe/past0", "probe/shape"], ["probe/past"])]
    else:
        graph.initializer.extend([numpy_helper.from_array(np.array([0.05], np.float32), f"probe/{n}_scale")
                                  for n in "kv"])
    for node in graph.node:
        if node.op_type != "GroupQueryAttention":
            nodes.append(node)
            continue
        inputs = list(node.input) + [""] * (11 - len(node.input))
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if kind == "dmmha":  # query, key, value, mask, attention bias, past key, past value, past length
            nodes.append(helper.make_node(
                "DecoderMaskedMultiHeadAttention", inputs[:3] + ["", inputs[10], inputs[3], inputs[4], "probe/past"],
                list(node.output), name=node.name, domain="com.microsoft", num_heads=attributes["num_heads"],
                past_present_share_buffer=1, scale=attributes.get("scale", 0.0)))
        else:
            node.input.extend([""] * (12 - len(node.input)) + ["probe/k_scale", "probe/v_scale"])
            node.attribute.extend([helper.make_attribute("k_quant_type", "PER_TENSOR"),
                                   helper.make_attribute("v_quant_type", "PER_TENSOR"),
                                   helper.make_attribute("kv_cache_bit_width", 8)])
            buffers.update(inputs[3:5] + list(node.output[1:3]))
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    for value in [*graph.input, *graph.output]:
        if value.name in buffers:
            value.type.tensor_type.elem_type = TensorProto.INT8
    onnx.save(model, str(out / "decoder.onnx"))
    return out


def attention_kernels(export: str, num_beams: int, rounds: int, threads: int) -> dict[str, Any]:
    import tempfile

    import runtime
    from bench.breakdown import split_call, timed_sessions
    from bench.step_cost import STEP_COST_NEW_TOKENS, call_windows

    with tempfile.TemporaryDirectory() as tmp:
        paths = {"gqa": Path(export)}
        for kind in ("dmmha", "int8-cache"):
            paths[kind] = _attention_variant(Path(export), Path(tmp) / kind, kind)
        models = {name: runtime.load(path, threads=threads) for name, path in paths.items()}
        ids = np.random.default_rng(0).integers(5, VOCAB - 100, (1, SRC_LEN))
        ids[:, -1] = 1
        found: dict[str, list[dict[str, Any]]] = {name: [] for name in models}
        tokens: dict[str, Any] = {}
        names = list(models)
        for r in range(rounds + 1):  # round 0 warms up
            for name in names[r % len(names):] + names[:r % len(names)]:
                model = models[name]
                with timed_sessions({"decoder": model.graphs.decoder.session}) as runs:
                    start = time.perf_counter()
                    out = model.generate(ids, max_new_tokens=STEP_COST_NEW_TOKENS,
                                         min_new_tokens=STEP_COST_NEW_TOKENS, num_beams=num_beams)
                    call = split_call(runs, start, time.perf_counter())
                tokens.setdefault(name, out)
                if r:
                    windows = call_windows(call)
                    found[name].append({"step": windows["512"][0] / windows["16"][0],
                                        "inside": windows["512"][1] / windows["16"][1],
                                        "ms16": windows["16"][0], "ms512": windows["512"][0]})
    return {name: {key: float(np.median([c[key] for c in calls])) for key in calls[0]}
            | {"same_tokens": bool(np.array_equal(tokens[name], tokens["gqa"]))} for name, calls in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="probe", required=True)
    p = sub.add_parser("kv-dtype")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--layers", type=int, default=6)
    p = sub.add_parser("unasked-outputs")
    p.add_argument("--rows", type=int, default=4)
    for name in ("pair", "arena", "rss"):
        p = sub.add_parser(name)
        p.add_argument("exports", nargs={"pair": 2, "arena": 1, "rss": "+"}[name])
        p.add_argument("--num-beams", type=int, default=1)
        p.add_argument("--batch-size", type=int, default=1)
        p.add_argument("--rounds", type=int, default=11 if name == "pair" else 2)
        p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("checkouts")
    p.add_argument("trees", nargs=3)
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("int8-cache")
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("attention-kernels")
    p.add_argument("export")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=2)
    p = sub.add_parser("_arena-child")
    for name in ("path", "arena", "num_beams", "batch", "threads"):
        p.add_argument(name)
    args = parser.parse_args()
    if args.probe == "kv-dtype":
        result: Any = kv_dtype(args.threads, args.rows, args.layers)
    elif args.probe == "unasked-outputs":
        result = unasked_outputs(args.rows)
    elif args.probe == "pair":
        result = pair(*args.exports, args.num_beams, args.batch_size, args.rounds, args.threads)
    elif args.probe == "checkouts":
        result = checkouts(*args.trees, args.num_beams, args.batch_size, args.rounds, args.threads)
    elif args.probe == "int8-cache":
        result = int8_cache(args.threads)
    elif args.probe == "attention-kernels":
        result = attention_kernels(args.export, args.num_beams, args.rounds, args.threads)
    elif args.probe == "arena":
        result = arena(args.exports, args.num_beams, args.batch_size, args.rounds, args.threads)
    elif args.probe == "rss":
        result = arena(args.exports, args.num_beams, args.batch_size, args.rounds, args.threads, arena_off=False)
    else:
        result = _arena_child(args.path, args.arena == "1", int(args.num_beams), int(args.batch), int(args.threads))
        print(json.dumps(result))
        return
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
