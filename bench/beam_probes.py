"""Measurements behind beam search's levers that were not built (bench/README.md, issue 10).

    python -m bench.beam_probes ranking-graphs [--rows 4,32,128] [--rounds 200]
    python -m bench.beam_probes thread-pools EXPORT [--cases 4x32,4x8,4x1,1x1,1x8] [--rounds 8] [--threads 2]

- ranking-graphs: the beam step's ranking graph as shipped (runtime/graphs `beam_candidates_float32`)
  against two variants built here from it: "blocked", a block-max prefilter before each row's top-k
  (the row's log-probs padded with -inf to blocks of 128, each block's max, the k best blocks in
  block order, the top-k of their 128 * k log-probs: the same k best, ties in id order, as over the
  whole row), and "lean", the shipped graph without the banned-ids nodes and with one EOS compared
  directly (what a step with no bans and one EOS needs). Each is first checked to give outputs equal
  to the shipped graph's on random logits and on integer-valued ones (many ties), beams in a permuted
  row order, at t5-small's vocabulary (32128, a multiple of 128) and BART's (50265, padded); then timed
  on one thread without spinning (as runtime/tensor_ops.py runs helper graphs), in turn, the order
  alternating; medians in microseconds.
- thread-pools: one export loaded in one process per mode, generate calls alternating call by call,
  the order rotating each round: "per-session" (the runtime as it is: each session its own pool, the
  decoder's spinning, the encoder's and the helper graphs' not), "shared" (every session on one
  global onnxruntime pool of `threads`, `set_global_thread_pool_sizes`; onnxruntime then requires
  every session of the process to use it) and "ranking-2-threads" (the beam ranking helper on
  `threads` threads of its own, not spinning). Per case the median of per-round ratios
  per-session / mode (above 1: the mode is faster), p10-p90, and whether the tokens are the same.
Every generate call asks for exactly 64 new tokens (min = max) from 32 random source tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

import numpy as np

NEW_TOKENS, SRC_LEN, BLOCK = 64, 32, 128
MODES = ("per-session", "shared", "ranking-2-threads")


def _ranking_variants() -> dict[str, Any]:
    """The shipped ranking graph and the two variants, as ModelProtos."""
    from onnx import TensorProto, helper

    from runtime.graphs.make_graphs import OPSET, beam_candidates

    shipped = beam_candidates("float32")
    nodes = list(shipped.graph.node)
    node = helper.make_node
    blocked_front = [
        node("LogSoftmax", ["logits"], ["log_probs"], axis=-1),
        node("Pad", ["log_probs", "pads", "minus_inf_pad"], ["padded"]),
        node("Reshape", ["padded", "blocks"], ["in_blocks"]),  # [rows, nb, BLOCK]
        node("ReduceMax", ["in_blocks"], ["block_max"], axes=[2], keepdims=0),  # [rows, nb]
        node("TopK", ["block_max", "k"], ["_block_values", "best_blocks"], axis=-1, largest=1, sorted=1),
        node("TopK", ["best_blocks", "k"], ["ordered_blocks", "_order"], axis=-1, largest=0, sorted=1),  # id order
        node("Unsqueeze", ["ordered_blocks", "block_axis"], ["ordered_column"]),  # [rows, k, 1]
        node("Shape", ["ordered_blocks"], ["ordered_shape"]),
        node("Concat", ["ordered_shape", "block_size"], ["gather_shape"], axis=0),
        node("Expand", ["ordered_column", "gather_shape"], ["gather_blocks"]),
        node("GatherElements", ["in_blocks", "gather_blocks"], ["candidates"], axis=1),  # [rows, k, BLOCK]
        node("Reshape", ["candidates", "one_row"], ["candidates_row"]),  # [rows, 1, k * BLOCK]
        node("TopK", ["candidates_row", "k"], ["row_values", "position"], axis=-1, largest=1, sorted=1),
        node("Div", ["position", "block_size"], ["slot"]),
        node("Mod", ["position", "block_size"], ["offset"]),
        node("Reshape", ["ordered_blocks", "one_row"], ["ordered_row"]),  # [rows, 1, k]
        node("GatherElements", ["ordered_row", "slot"], ["block"], axis=2),
        node("Mul", ["block", "block_size"], ["block_start"]),
        node("Add", ["block_start", "offset"], ["row_indices"]),
    ]
    constants = [helper.make_tensor("block_axis", TensorProto.INT64, [1], [2]),
                 helper.make_tensor("block_size", TensorProto.INT64, [1], [BLOCK]),
                 helper.make_tensor("one_row", TensorProto.INT64, [3], [0, 1, -1]),
                 helper.make_tensor("minus_inf_pad", TensorProto.FLOAT, [], [float("-inf")])]
    # the shipped graph from the first Gather on (its LogSoftmax and per-row TopK replaced)
    rest = [n for n in nodes if not (n.op_type == "LogSoftmax" or (n.op_type == "TopK" and "row_values" in n.output))]
    blocked_inputs = [*shipped.graph.input, helper.make_tensor_value_info("blocks", TensorProto.INT64, [3]),
                      helper.make_tensor_value_info("pads", TensorProto.INT64, [6])]
    banned_only = {"indices_column", "hits", "hits_float", "hit_count", "is_banned", "allowed", "minus_inf"}
    eos_only = {"eos_hits", "eos_hits_float", "eos_count", "candidate_column", "candidate_stops"}
    lean = [n for n in nodes if not set(n.output) & (banned_only | eos_only)]
    for n in lean:  # the totals from the values themselves, no bans
        if n.op_type == "Add" and "allowed" in n.input:
            n.input[list(n.input).index("allowed")] = "values"
    lean.insert(next(i for i, n in enumerate(lean) if "stops_int" in n.output),
                node("Equal", ["candidate_ids", "eos"], ["candidate_stops"]))  # eos: [1]
    lean_inputs = [i for i in shipped.graph.input if i.name != "banned"]

    def model(graph_nodes: list[Any], name: str, inputs: list[Any], initializer: list[Any]) -> Any:
        graph = helper.make_graph(graph_nodes, name, inputs, list(shipped.graph.output), initializer=initializer)
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        proto.ir_version = 8
        return proto

    return {"shipped": shipped, "blocked": model(blocked_front + rest, "blocked", blocked_inputs, constants),
            "lean": model(lean, "lean", lean_inputs, [])}


def _helper_session(proto: Any) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _ranking_feeds(rows: int, vocab: int, logits: np.ndarray, seed: int) -> dict[str, dict[str, np.ndarray]]:
    """Each variant's feeds for one ranking of `logits` ([rows, 1, vocab]), beam 4, keep 8."""
    rng = np.random.default_rng(seed)
    n = rows // 4
    shipped = {"logits": logits, "k": np.array([8]), "scores": rng.standard_normal((n, 4)).astype(np.float32),
               "banned": np.array([-1]), "groups": np.array([n, -1]), "keep": np.array([8]), "eos": np.array([1]),
               "row_of_beam": rng.permutation(rows).astype(np.int64)}
    blocks = -(-vocab // BLOCK)
    pads = np.array([0, 0, 0, 0, 0, blocks * BLOCK - vocab])  # -inf after the last id, to whole blocks
    blocked = dict(shipped, blocks=np.array([rows, blocks, BLOCK]), pads=pads)
    lean = {name: value for name, value in shipped.items() if name != "banned"}
    return {"shipped": shipped, "blocked": blocked, "lean": lean}


def ranking_graphs(rows_list: list[int], rounds: int) -> list[dict[str, Any]]:
    sessions = {name: _helper_session(proto) for name, proto in _ranking_variants().items()}
    results = []
    for vocab in (32128, 50265):
        for rows in rows_list:
            rng = np.random.default_rng(rows)
            logits = (rng.standard_normal((rows, 1, vocab)) * 3).astype(np.float32)
            for values in (logits, np.round(logits)):  # the second: integer-valued, many exact ties
                feeds = _ranking_feeds(rows, vocab, values, rows)
                reference = sessions["shipped"].run(None, feeds["shipped"])
                for name in ("blocked", "lean"):
                    got = sessions[name].run(None, feeds[name])
                    if not all(np.array_equal(a, b) for a, b in zip(reference, got)):
                        raise AssertionError(f"{name} ranks otherwise than the shipped graph "
                                             f"(vocab {vocab}, rows {rows})")
            feeds = _ranking_feeds(rows, vocab, logits, rows)
            times: dict[str, list[float]] = {name: [] for name in sessions}
            names = list(sessions)
            for i in range(rounds):
                for name in names[i % len(names):] + names[:i % len(names)]:
                    start = time.perf_counter()
                    sessions[name].run(None, feeds[name])
                    times[name].append(time.perf_counter() - start)
            results.append({"vocab": vocab, "rows": rows, "same_outputs": True,
                            **{f"{name}_us": round(float(np.median(t)) * 1e6, 1) for name, t in times.items()}})
    return results


_POOL_CHILD = """
import hashlib, sys, time
import numpy as np
mode, path = sys.argv[1], sys.argv[2]
threads, new_tokens, src_len = (int(a) for a in sys.argv[3:6])
import onnxruntime as ort
if mode == "shared":
    from onnxruntime.capi import onnxruntime_pybind11_state as state
    state.set_global_thread_pool_sizes(threads, 1)
    plain = ort.SessionOptions
    class Shared(plain):
        def __init__(self):
            super().__init__()
            self.use_per_session_threads = False
    ort.SessionOptions = Shared
import runtime
if mode == "ranking-2-threads":
    from runtime import tensor_ops
    from runtime.sessions import Graph
    def _graph(self, name):
        graph = self._graphs.get(name)
        if graph is None:
            count = threads if name.startswith("beam_candidates") else 1
            graph = self._graphs[name] = Graph(tensor_ops._GRAPHS_DIR / f"{name}.onnx", self._config,
                                               spinning=False, threads=count)
        return graph
    tensor_ops.TensorOps._graph = _graph
model = runtime.load(path, provider="cpu", threads=threads)
out, sys.stdout = sys.stdout, sys.stderr
out.write("ready\\n"); out.flush()
for line in sys.stdin:
    beams, batch = map(int, line.split())
    ids = np.random.default_rng(batch).integers(5, 30000, size=(batch, src_len)).astype(np.int64)
    start = time.perf_counter()
    tokens = model.generate(ids, np.ones_like(ids), num_beams=beams, max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens)
    out.write(f"{(time.perf_counter() - start) * 1e3} {hashlib.sha1(tokens.tobytes()).hexdigest()}\\n"); out.flush()
"""


def thread_pools(path: str, cases: list[tuple[int, int]], rounds: int, threads: int) -> list[dict[str, Any]]:
    children = {}
    for mode in MODES:
        args = [mode, path, str(threads), str(NEW_TOKENS), str(SRC_LEN)]
        child = subprocess.Popen([sys.executable, "-c", _POOL_CHILD, *args],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert child.stdout is not None and child.stdout.readline().strip() == "ready", f"{mode} did not start"
        children[mode] = child

    def call(mode: str, beams: int, batch: int) -> tuple[float, str]:
        child = children[mode]
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(f"{beams} {batch}\n")
        child.stdin.flush()
        ms, digest = child.stdout.readline().split()
        return float(ms), digest

    results = []
    try:
        for beams, batch in cases:
            for mode in MODES:
                call(mode, beams, batch)  # warm-up
            times: dict[str, list[float]] = {mode: [] for mode in MODES}
            digests: dict[str, set[str]] = {mode: set() for mode in MODES}
            for i in range(rounds):
                for mode in MODES[i % len(MODES):] + MODES[:i % len(MODES)]:
                    ms, digest = call(mode, beams, batch)
                    times[mode].append(ms)
                    digests[mode].add(digest)
            base = np.array(times["per-session"])
            entry: dict[str, Any] = {"num_beams": beams, "batch": batch,
                                     "per_session_ms": round(float(np.median(base)), 1)}
            for mode in MODES[1:]:
                ratios = base / np.array(times[mode])
                entry[mode] = {"per_session_over_mode": round(float(np.median(ratios)), 3),
                               "p10": round(float(np.percentile(ratios, 10)), 3),
                               "p90": round(float(np.percentile(ratios, 90)), 3),
                               "same_tokens": digests[mode] == digests["per-session"]}
            results.append(entry)
    finally:
        for child in children.values():
            if child.stdin is not None:
                child.stdin.close()
            child.wait(timeout=60)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="probe", required=True)
    p = sub.add_parser("ranking-graphs")
    p.add_argument("--rows", default="4,32,128")
    p.add_argument("--rounds", type=int, default=200)
    p = sub.add_parser("thread-pools")
    p.add_argument("export")
    p.add_argument("--cases", default="4x32,4x8,4x1,1x1,1x8", help="NUM_BEAMSxBATCH, comma-separated")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.probe == "ranking-graphs":
        result: Any = ranking_graphs([int(r) for r in args.rows.split(",")], args.rounds)
    else:
        cases = [(int(b), int(n)) for b, n in (case.split("x") for case in args.cases.split(","))]
        result = thread_pools(args.export, cases, args.rounds, args.threads)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
