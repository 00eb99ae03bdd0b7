"""Tensor work between decoder steps, done where the tensors live: row gathers, log-softmax, top-k.

The decoder's states and logits stay where onnxruntime put them (runtime/sessions.py). What the searches
need between two steps runs beside them, through tiny committed graphs (runtime/graphs/make_graphs.py),
so on CUDA nothing of the cache, and at most the top candidates of the logits, reach the host:

- `take(value, rows, axis)`: a new tensor of those rows (greedy rows that finished, beam inputs that
  are done, beams repeated from the encoder output); on a device through a graph, in host memory by numpy;
- `reorder(value, rows, axis)`: the same number of rows, permuted (beam search). In host memory only the
  rows that change are rewritten, in place: measured on the CPU (t5-small shape, 32 rows, past 64, 12
  cache tensors), a gather of every row into a new array cost 19 ms a step, onnxruntime's Gather into its
  arena 5 ms, rewriting half of the rows in place 1.3 ms;
- `log_softmax(logits)`: the log-probs beam search starts from when logits rules must see them all;
- `beam_candidates(logits, k, scores, bans, keep)`: else a beam step's whole ranking, from each row's k
  best log-probs to each input's `keep` best continuations (only those reach the host); `row_of_beam`
  says which logits row holds each beam, for a decoder that renames rows on a beam reorder.

One instance per loaded model; thread-safe (graphs are created on first use under a lock, and hold no
per-call state).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from runtime.search import Candidates
from runtime.sessions import Binding, Graph, ProviderConfig, device_array, host_view, new_buffer, value_dtype

_GRAPHS_DIR = Path(__file__).parent / "graphs"

# (dtype, axis) pairs a device tensor can be gathered along: K/V caches (axis 0), LSTM (h, c) (axis 1),
# the encoder attention mask (int64, axis 0).
SELECTABLE = tuple((dtype, axis) for dtype in ("float32", "float16", "int64") for axis in (0, 1))
LOGITS_DTYPES = ("float32", "float16")


class TensorOps:
    def __init__(self, config: ProviderConfig):
        self._config = config
        self._graphs: dict[str, Graph] = {}
        self._lock = threading.Lock()

    def _graph(self, name: str) -> Graph:
        graph = self._graphs.get(name)
        if graph is None:
            with self._lock:
                graph = self._graphs.get(name)
                if graph is None:
                    # One thread, no spinning: these run between decoder steps, and a pool of their own
                    # kept spinning would take a core from the decoder's.
                    graph = Graph(_GRAPHS_DIR / f"{name}.onnx", self._config, spinning=False, threads=1)
                    self._graphs[name] = graph
        return graph

    def loaded(self) -> dict[str, Graph]:
        """The helper graphs created so far, by name (for profilers: each is one session.run per use)."""
        return dict(self._graphs)

    def to_device(self, value: np.ndarray) -> Any:
        """With IO binding, a tensor fed every step (the encoder mask) as an OrtValue, uploaded once."""
        return device_array(value, self._config.device) if self._config.binds else value

    def new_buffer(self, shape: list[int], dtype: DTypeLike) -> Any:
        """A zeroed tensor on this provider's device that a graph writes in place (a `buffer` state)."""
        return new_buffer(shape, dtype, self._config.device)

    def take(self, value: Any, rows: np.ndarray, axis: int, written: tuple[int, int] | None = None) -> Any:
        """A new tensor holding rows `rows` ([n] int64) of `value` along `axis` (numpy array or OrtValue).

        written: (seq_axis, length) for a buffer, whose positions past `length` are never read: in host
        memory only the written ones are copied, into a new zeroed buffer of the same capacity."""
        host = host_view(value)
        if written is not None and host is not None:
            shape = list(host.shape)
            shape[axis] = rows.shape[0]
            taken = new_buffer(shape, host.dtype, "cpu")  # host memory in, host memory out
            part = (slice(None),) * written[0] + (slice(0, written[1]),)
            taken.numpy()[part] = np.take(host[part], rows, axis=axis)  # numpy(): a view of the OrtValue's memory
            return taken
        dtype = value_dtype(value).name
        if host is not None and self._config.device == "cpu":
            # numpy where the value lives on the host, wrapped: t5-small's 12 encoder outputs repeated for
            # beam 4 at batch 1 took 249 us against 391 through the helper graph (scratch timing, warm)
            taken = np.take(host, rows, axis=axis)
            return device_array(taken, "cpu") if self._config.binds else taken
        if host is not None and (not self._config.binds or (dtype, axis) not in SELECTABLE):
            return np.take(host, rows, axis=axis)
        graph = self._graph(f"select_rows_{dtype}_axis{axis}")
        return graph.run({"values": value, "rows": rows.astype(np.int64, copy=False)}, ["selected"])["selected"]

    def reorder(self, value: Any, rows: np.ndarray, axis: int, written: tuple[int, int] | None = None,
                changed: np.ndarray | None = None) -> Any:
        """Rows `rows` of `value` along `axis`, where `rows` has one index per row (a permutation with
        repeats, as beam search makes). In host memory the value is rewritten in place, so it must be
        the caller's own (no other live tensor may share its memory); on a device it is `take`.
        written: as for `take` (only a buffer's written positions move). changed: the indices where
        `rows` differs from arange, when the caller reorders several tensors by the same rows."""
        host = host_view(value)
        if host is None:
            return self.take(value, rows, axis, written)
        if changed is None:
            changed = np.flatnonzero(rows != np.arange(rows.shape[0]))
        if changed.size:
            source: list[Any] = [slice(None)] * host.ndim
            if written is not None:
                source[written[0]] = slice(0, written[1])
            target = list(source)
            source[axis], target[axis] = rows[changed], changed
            # The right side is a copy (advanced indexing), so overlapping rows are safe. Indexing the
            # buffer directly, not a sliced view of it: np.take over a strided view was 1.7x slower.
            host[tuple(target)] = host[tuple(source)]
        return value

    def log_softmax(self, logits: Any) -> np.ndarray:
        """logits: [rows, 1, vocab] (float32 or float16) -> log-probs [rows, vocab] float32 on the host,
        a new array the caller may edit."""
        graph = self._graph(f"log_softmax_{value_dtype(logits).name}")
        result = _run_to_host(graph, {"logits": logits}, ["log_probs"])["log_probs"]
        return result.reshape(result.shape[0], -1)

    def beam_candidates(self, logits: Any, k: int, scores: np.ndarray, bans: tuple[int, ...], keep: int,
                        eos: tuple[int, ...], row_of_beam: np.ndarray | None = None) -> Candidates:
        """logits: [rows, 1, vocab] (float32 or float16) -> a beam step's ranking, as
        `search.log_probs.rank_candidates` of each row's k best log-probs (scores: [n, num_beams] float32
        running scores; bans: ids at -inf in every row; eos: the ids that stop a candidate), on the host.
        row_of_beam: [rows] int64, the logits row of each beam (None: row i is beam i).
        Only the candidates leave the device."""
        graph = self._graph(f"beam_candidates_{value_dtype(logits).name}")
        rows = scores.shape[0] * scores.shape[1]
        order = np.arange(rows, dtype=np.int64) if row_of_beam is None else row_of_beam
        feeds = _candidate_feeds(logits, k, scores, scores.shape[0], bans, keep, eos, order)
        result = _run_to_host(graph, feeds, list(CANDIDATES))
        return Candidates(result["candidate_scores"], result["candidate_beams"], result["candidate_ids"],
                          result["candidate_stops"], int(result["stopping"][0]))

    def bound_beam_candidates(self, logits: Any, k: int, shape: tuple[int, int], keep: int,
                              eos: tuple[int, ...], row_of_beam: np.ndarray) -> BoundBeamCandidates:
        """`beam_candidates` bound to `logits` (an OrtValue in host memory, [rows, 1, vocab], rewritten in
        place by the decoder each step) for running scores of `shape` [n, num_beams], and to `row_of_beam`
        ([rows] int64 in host memory, which the caller may rewrite between runs); `run` it after each step."""
        if host_view(logits) is None:
            raise ValueError("bound_beam_candidates needs logits in host memory")
        graph = self._graph(f"beam_candidates_{value_dtype(logits).name}")
        return BoundBeamCandidates(graph, logits, k, shape, keep, eos, row_of_beam)


CANDIDATES = ("candidate_scores", "candidate_beams", "candidate_ids", "candidate_stops", "stopping")


def _candidate_feeds(logits: Any, k: int, scores: Any, inputs: int, bans: tuple[int, ...], keep: int,
                     eos: tuple[int, ...], row_of_beam: Any) -> dict[str, Any]:
    # -1 for no id: the graph compares against at least one
    return {"logits": logits, "k": np.array([k], dtype=np.int64), "scores": scores,
            "banned": np.array(bans or (-1,), dtype=np.int64), "groups": np.array([inputs, -1], dtype=np.int64),
            "keep": np.array([keep], dtype=np.int64), "eos": np.array(eos or (-1,), dtype=np.int64),
            "row_of_beam": row_of_beam}


class BoundBeamCandidates:
    """`TensorOps.beam_candidates` of one logits tensor that a decoder rewrites in place every step, bound
    once: each `run` copies the running scores into a bound array, reruns, and returns the binding's own
    output arrays (the next run writes over them). One call's, on the CPU. Measured on the t5-small
    shape, int8, beam 4, batch 1: the numpy ranking after a top-k graph was ~16 numpy calls between two
    decoder runs, ~100 us a step on caches the decoder had just flushed."""

    def __init__(self, graph: Graph, logits: Any, k: int, shape: tuple[int, int], keep: int, eos: tuple[int, ...],
                 row_of_beam: np.ndarray):
        self.logits, self.key, self.row_of_beam = logits, (k, shape, keep, eos), row_of_beam
        self._scores = np.zeros(shape, dtype=np.float32)
        n = shape[0]
        arrays: list[np.ndarray] = [np.empty((n, keep), dtype=np.float32), np.empty((n, keep), dtype=np.int64),
                                    np.empty((n, keep), dtype=np.int64), np.empty((n, keep), dtype=bool),
                                    np.zeros(1, dtype=np.int64)]
        self._arrays = arrays[:4]
        self._stopping = arrays[4].data  # read without a numpy call
        self._into = {name: device_array(array, "cpu") for name, array in zip(CANDIDATES, arrays)}
        self._feeds = _candidate_feeds(logits, k, device_array(self._scores, "cpu"), n, (), keep, eos,
                                       device_array(row_of_beam, "cpu"))
        self._bans: tuple[int, ...] | None = None
        self._binding = Binding(graph)

    def run(self, scores: np.ndarray, bans: tuple[int, ...]) -> Candidates:
        """The ranking of the logits as the decoder left them; scores: [n, num_beams] float32."""
        self._scores[...] = scores
        if bans == self._bans:
            self._binding.rerun()
        else:  # the first run, or other bans (MinLength's end): bound anew
            self._feeds["banned"] = np.array(bans or (-1,), dtype=np.int64)
            self._binding.run(self._feeds, list(CANDIDATES), into=self._into)
            self._bans = bans
        scores, beams, ids, stops = self._arrays
        return Candidates(scores, beams, ids, stops, self._stopping[0])


def _run_to_host(graph: Graph, feeds: dict[str, Any], outputs: list[str]) -> dict[str, np.ndarray]:
    """Run a helper graph whose outputs the caller reads on the host. With every input in host memory
    (the CPU), a plain run reading them where they are: binding anew on each call cost more than the
    graph's own run at beam 4, batch 1 (t5-small shape). On a device, bound, the inputs staying there."""
    views = {name: host_view(value) for name, value in feeds.items()}
    if all(view is not None for view in views.values()):
        return graph.run_plain(views, outputs)
    return graph.run(feeds, outputs, host_outputs=outputs)
