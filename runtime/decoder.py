"""The decoding loop's machinery: run the encoder once, then step the decoder, feeding state back.

`EncoderDecoderGraphs` holds the loaded sessions of one export directory (shared, read-only).
`CachedDecoder` is one call's decoder (the `DecoderStep` of runtime/search): it owns that call's state
tensors, so concurrent calls on one model share nothing mutable. The states stay where onnxruntime put
them between steps (runtime/sessions.py); reorders, log-softmax and top-k run beside them
(runtime/tensor_ops.py).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import ExportDirError
from runtime.host_arrays import SpareArrays
from runtime.manifest import (
    ATTENTION_MASK,
    ENCODER_ATTENTION_MASK,
    ENCODER_HIDDEN_STATES,
    GREEDY_BIAS,
    INPUT_IDS,
    LAST_HIDDEN_STATE,
    LOGITS,
    LOGITS_ROWS,
    NEXT_IDS,
    SEQLENS_K,
    TOTAL_SEQUENCE_LENGTH,
    Manifest,
    StateTensor,
    encoder_inits,
)
from runtime.search import Candidates, PinnedStep, Shared
from runtime.sessions import Binding, Graph, ProviderConfig, device_array, host_view
from runtime.tensor_ops import SELECTABLE, BoundBeamCandidates, TensorOps


@dataclass(frozen=True)
class EncoderOutputs:
    """What the decoder needs from the encoder, for `rows` = batch * beams rows (beam-major per input)."""

    attention_mask: Any  # [rows, src_len] int64 (an OrtValue on the device with IO binding)
    values: dict[str, Any]  # encoder output name -> [rows, ...] (last_hidden_state and state inits)
    input_of_row: np.ndarray  # [rows] int64: the input each row belongs to
    memory: np.ndarray | None = None  # host memory `values` were repeated into (SpareArrays.repeat), or None


@dataclass(frozen=True)
class SteadyStep:
    """A decoder step whose every input but the token ids and the positions is bound already, and whose
    every output is written in place (a kv-buffer export): the step after it writes the ids and the
    positions into the bound arrays and runs, nothing else. Valid while the call's states are the same
    objects (`CachedDecoder._version`)."""

    binding: Binding
    ids: np.ndarray  # [rows, 1] int64, bound by memory
    seqlens: np.ndarray  # [rows] int32, bound by memory
    total: np.ndarray  # [] int32, bound by memory
    logits: Any  # the logits tensor the graph writes
    host: np.ndarray | None  # [rows, 1, vocab]: a numpy view of its memory, when that is on the host
    scores: np.ndarray | None  # [rows, vocab] float32 view of it, when the logits are float32 on the host
    version: int
    positions: memoryview  # [capacity + 1, rows] int32, flat: row p is every row's seqlens at position p
    _views: tuple[memoryview, memoryview] = field(init=False)  # seqlens, total (as [1])

    def __post_init__(self) -> None:
        object.__setattr__(self, "_views", (self.seqlens.data, self.total.reshape(1).data))

    def write_positions(self, position: int) -> None:
        """seqlens and total of a step at `position`, through memoryviews: no numpy call between two
        decoder runs (runtime/search/__init__.py's PinnedStep says why that counts)."""
        seqlens, total = self._views
        rows = len(seqlens)
        seqlens[:] = self.positions[position * rows:(position + 1) * rows]
        total[0] = position + 1


@dataclass(frozen=True)
class HeadStep:
    """The steady step with the decoder's greedy head (exporter/passes/greedy_head.py): the same inputs
    but no logits rows, each row's argmax of logits + `bias` written into `next_ids`."""

    binding: Binding
    next_ids: np.ndarray  # [rows] int64, bound by memory
    bias: np.ndarray  # [vocab] float32, bound by memory
    steady: SteadyStep  # the step whose binding this one's derives from


class EncoderDecoderGraphs:
    """The sessions of one export directory. Built once per process; safe to share across threads."""

    def __init__(self, export_dir: Path, manifest: Manifest, config: ProviderConfig):
        if manifest.encoder_file is None or manifest.vocab_size is None:
            raise ExportDirError(f"{str(export_dir)!r} holds a {manifest.kind} model, not an encoder-decoder: "
                                 "load it with runtime.load")
        self.manifest = manifest
        self.config = config
        manifest.check_shared_weights(export_dir)
        self.encoder = Graph(export_dir / manifest.encoder_file, config, spinning=False)
        self.decoder = Graph(export_dir / manifest.decoder_file, config)
        self.first_step = Graph(export_dir / manifest.first_step_file, config, spinning=False) \
            if manifest.first_step_file else None
        self.ops = TensorOps(config)
        self.spare = SpareArrays()  # the host buffer block and logits of a finished call, for the next
        self._check_io()
        self._warn_if_attention_leaves_the_device()
        # Encoder outputs the decoder needs: the hidden states (if any decoder graph reads them) and state inits.
        needs_hidden = any(ENCODER_HIDDEN_STATES in g.inputs for g in self._decoder_graphs())
        self.encoder_outputs = [LAST_HIDDEN_STATE] if needs_hidden else []
        self.encoder_outputs += encoder_inits(manifest.states).values()
        logits_dim = self.decoder.outputs[LOGITS].shape[-1]
        self.vocab_size: int = logits_dim if isinstance(logits_dim, int) else manifest.vocab_size
        self.logits_sized = isinstance(logits_dim, int)  # the graph says its vocabulary: logits can be preallocated
        # A greedy head's bias when no id is banned (read-only; every run but a head step's gets it).
        self.no_bias = np.zeros(self.vocab_size, dtype=np.float32) if LOGITS_ROWS in self.decoder.inputs else None

    def _warn_if_attention_leaves_the_device(self) -> None:
        """onnxruntime's CUDA GroupQueryAttention (the kv-buffer layout's attention) takes float16 only: a
        float32 kv-buffer export on CUDA would run every layer's attention on the CPU, copying its cache
        across each step. Say so once, with the fix."""
        buffers = [s for s in self.manifest.states if s.kind == "buffer"]
        if self.config.device != "cpu" and buffers and self.decoder.inputs[buffers[0].input_name].dtype != np.float16:
            warnings.warn(f"{self.decoder.name} keeps its self-attention cache in float32 buffers, whose attention "
                          "onnxruntime runs on the CPU under CUDA; for CUDA export with --dtype fp16, or with "
                          "--no-kv-buffer", stacklevel=4)

    def _decoder_graphs(self) -> list[Graph]:
        return [g for g in (self.first_step, self.decoder) if g is not None]

    def _check_io(self) -> None:
        """Fail at load, naming the graph and tensor, when the graphs do not match the manifest."""
        def fail(msg: str) -> None:
            raise ExportDirError(f"{msg}; the directory is inconsistent with its s2s.json, re-export the model")

        def require(graph: Graph, names: list[str], where: str) -> None:
            table = graph.inputs if where == "input" else graph.outputs
            missing = [n for n in names if n not in table]
            if missing:
                fail(f"{graph.name} lacks {where}(s) {missing} that s2s.json names")

        m = self.manifest
        require(self.encoder, [INPUT_IDS], "input")
        require(self.encoder, list(encoder_inits(m.states).values()), "output")
        require(self.decoder, [INPUT_IDS] + [s.input_name for s in m.states], "input")
        require(self.decoder, [LOGITS], "output")
        if m.use_cache_branch:
            require(self.decoder, [m.use_cache_branch], "input")
        if self.first_step is not None:
            require(self.first_step, [INPUT_IDS], "input")
            require(self.first_step, [LOGITS], "output")
        m.check_feedable(self.encoder.name, self.encoder.inputs, "encoder")
        for graph in self._decoder_graphs():
            m.check_feedable(graph.name, graph.inputs, "decoder")
        step0 = self.first_step or self.decoder
        for state in m.states:
            spec = self.decoder.inputs[state.input_name]
            # Fed back every step (grows, recurrent) -> the cached step must emit it; a fixed state not
            # given by the encoder must come out of step 0.
            source = self.decoder if state.kind != "fixed" else step0
            if state.output_name is not None and state.output_name not in source.outputs:
                fail(f"{source.name} does not emit {state.output_name!r}, which feeds state {state.input_name!r}")
            if state.init == "empty" and state.input_name in step0.inputs:
                fixed_dims = [axis for axis, dim in enumerate(spec.shape)
                              if axis not in (state.batch_axis, state.seq_axis) and not isinstance(dim, int)]
                if state.seq_axis is None or fixed_dims:
                    fail(f"state {state.input_name!r} starts empty, so it needs a seq_axis and fixed sizes on its "
                         f"other axes; its shape is {spec.shape}")
            if self.config.device != "cpu" and (np.dtype(spec.dtype).name, state.batch_axis) not in SELECTABLE:
                fail(f"state {state.input_name!r} ({np.dtype(spec.dtype).name}, batch axis {state.batch_axis}) "
                     "cannot be reordered on the device")

    def encode(self, input_ids: np.ndarray, attention_mask: np.ndarray, repeat: int) -> EncoderOutputs:
        """Run the encoder once. input_ids, attention_mask: [batch, src_len] int64.

        Each output row is repeated `repeat` times (beam search), beam-major per input like
        transformers' `_expand_inputs_for_generation`.
        """
        feeds = {INPUT_IDS: input_ids}
        if ATTENTION_MASK in self.encoder.inputs:
            feeds[ATTENTION_MASK] = attention_mask
        values = self.encoder.run(feeds, self.encoder_outputs)
        batch_axis = {LAST_HIDDEN_STATE: 0}
        batch_axis.update({s.encoder_output: s.batch_axis for s in self.manifest.states if s.encoder_output})
        input_of_row = np.repeat(np.arange(input_ids.shape[0]), repeat)
        memory = None
        if repeat > 1:
            hosts = {name: view for name, view in ((n, host_view(v)) for n, v in values.items()) if view is not None}
            if self.config.device == "cpu" and len(hosts) == len(values):
                # into the memory of a call before (SpareArrays), handed back by the decoder's release
                repeated, memory = self.spare.repeat(hosts, repeat, batch_axis)
                values = {name: self.ops.to_device(v) for name, v in repeated.items()}
            else:
                values = {name: self.ops.take(v, input_of_row, batch_axis[name]) for name, v in values.items()}
            attention_mask = np.repeat(attention_mask, repeat, axis=0)
        return EncoderOutputs(attention_mask=self.ops.to_device(attention_mask), values=values,
                              input_of_row=input_of_row, memory=memory)


class CachedDecoder:
    """One call's decoder step (implements runtime.search.DecoderStep)."""

    def __init__(self, graphs: EncoderDecoderGraphs, encoded: EncoderOutputs, capacity: int):
        """capacity: the most decoder positions this call writes (its max length): the size of `buffer` states."""
        self._graphs = graphs
        self._capacity = capacity
        self._mask = encoded.attention_mask  # [rows, src_len] int64
        self._hidden = encoded.values.get(LAST_HIDDEN_STATE)  # [rows, src_len, hidden] or None
        self._input_of_row = encoded.input_of_row  # [rows] int64
        self._encoded_memory = encoded.memory  # handed back by `release`
        self._states: dict[str, Any] = {  # state input name -> value; filled from the encoder or step 0
            name: encoded.values[output] for name, output in encoder_inits(graphs.manifest.states).items()
        }
        self._step = 0
        self._bindings: dict[str, Binding] = {}  # graph file -> its binding for this call
        self._version = 0  # counts the times a state, the mask or the hidden states became another object
        self._steady: SteadyStep | None = None
        self._head: HeadStep | None = None  # the steady step with the greedy head, made when greedy asks
        self._all_rows = np.array([self.rows], dtype=np.int64)  # logits for every row (LOGITS_ROWS)
        self._candidates: BoundBeamCandidates | None = None  # beam search's ranking, bound to the steady step's logits
        self._logits: Any = None  # [rows, 1, vocab], written in place each step when every output can be
        self._logits_memory: np.ndarray | None = None  # on the CPU: the host array `_logits` wraps
        self._block: np.ndarray | None = None  # [n, rows, ...]: the buffer states, when they share a shape
        self._block_names: list[str] = []
        self._block_holds_all = False  # every state but the fixed ones is in the block
        self._block_axes: tuple[int, int | None] = (0, None)  # the buffers' batch and sequence axes
        self._logits_rows = 0
        # The decoder row ("slot") each row is kept in: a beam reorder moves rows by renaming slots
        # (`_reorder_slots`), so the two stay in step only up to an order within each input. Rewritten in
        # place (the bound ranking reads it); made anew when the row count changes.
        self._slots = np.arange(self.rows, dtype=np.int64)  # [rows] int64
        self._slot_list: list[int] = self._slots.tolist()
        self._permuted = False  # some row is not in its own slot

    @property
    def rows(self) -> int:
        return self._input_of_row.shape[0]

    def __call__(self, input_ids: np.ndarray) -> np.ndarray:
        """input_ids: [rows] int64 -> logits [rows, vocab] float32 on the host (the caller may edit them;
        the next step may write over them)."""
        logits = self._run(input_ids, logits_on_host=True)  # [rows, 1, vocab]
        if self._permuted:
            return logits[self._slots, -1, :].astype(np.float32, copy=False)
        steady = self._steady
        if steady is not None and logits is steady.host and steady.scores is not None:
            return steady.scores  # a view of the logits' memory, made once: nothing to slice or convert
        return logits[:, -1, :].astype(np.float32, copy=False)

    def log_probs(self, input_ids: np.ndarray) -> np.ndarray:
        """input_ids: [rows] int64 -> log_softmax(logits): [rows, vocab] float32 on the host."""
        log_probs = self._graphs.ops.log_softmax(self._run(input_ids, logits_on_host=False))
        return log_probs[self._slots] if self._permuted else log_probs

    def beam_candidates(self, input_ids: np.ndarray, scores: np.ndarray, bans: tuple[int, ...], keep: int,
                        eos: tuple[int, ...]) -> Candidates:
        """One step, ranked for beam search (search.log_probs.ScoringStep.beam_candidates): the logits
        never leave the device, and on the CPU the steady step's ranking reruns one binding."""
        k = min(keep + len(bans), self._graphs.vocab_size)
        logits = self._run(input_ids, logits_on_host=False)
        steady = self._steady
        if steady is None or steady.host is None or logits is not steady.host:  # not a steady step on the CPU
            return self._graphs.ops.beam_candidates(logits, k, scores, bans, keep, eos,
                                                    self._slots if self._permuted else None)
        bound = self._candidates
        if bound is None or bound.logits is not steady.logits or bound.key != (k, scores.shape, keep, eos) \
                or bound.row_of_beam is not self._slots:
            bound = self._candidates = self._graphs.ops.bound_beam_candidates(steady.logits, k, scores.shape,
                                                                             keep, eos, self._slots)
        return bound.run(scores, bans)

    def pinned(self) -> PinnedStep | None:
        """The steady step as a `PinnedStep`, when the next step can be it and its logits are float32 on
        the host (a kv-buffer export on the CPU, after its first step); else None."""
        steady = self._steady
        if steady is None or steady.scores is None or not self._holds(steady) or self._permuted:
            return None
        head = self._head_step(steady)
        write_positions, rerun = steady.write_positions, (head or steady).binding.rerun

        def run() -> None:
            position = self._step
            write_positions(position)
            rerun()
            self._step = position + 1

        return PinnedStep(steady.ids.reshape(self.rows).data, steady.scores, run,
                          head.next_ids.data if head else None, head.bias if head else None)

    def _head_step(self, steady: SteadyStep) -> HeadStep | None:
        """`steady` with the greedy head, when the decoder has one (made once per steady step)."""
        graphs = self._graphs
        if graphs.manifest.greedy_head is None or NEXT_IDS not in graphs.decoder.outputs or steady.host is None:
            return None
        head = self._head
        if head is None or head.steady is not steady:
            next_ids = np.zeros(self.rows, dtype=np.int64)
            bias = np.zeros(graphs.vocab_size, dtype=np.float32)
            no_logits = np.empty((0, *steady.host.shape[1:]), dtype=steady.host.dtype)
            binding = steady.binding.derived(
                {LOGITS_ROWS: np.zeros(1, dtype=np.int64), GREEDY_BIAS: bias},
                {LOGITS: device_array(no_logits, "cpu"), NEXT_IDS: device_array(next_ids.reshape(-1, 1), "cpu")})
            head = self._head = HeadStep(binding, next_ids, bias, steady)
        return head

    def _run(self, input_ids: np.ndarray, logits_on_host: bool) -> Any:
        """One decoder step; returns its logits, [rows, 1, vocab] (numpy, or where the provider put them)."""
        steady = self._steady
        if steady is not None and self._holds(steady):
            self._rerun(steady, input_ids)
            if steady.host is not None:  # on the CPU: a view, no conversion
                return steady.host
            return steady.logits.numpy() if logits_on_host else steady.logits
        graphs, manifest = self._graphs, self._graphs.manifest
        first = self._step == 0
        graph = graphs.first_step if first and graphs.first_step is not None else graphs.decoder
        if self._permuted:  # each row's id into its slot
            input_ids = _in_slots(input_ids, self._slots)
        feeds: dict[str, Any] = {INPUT_IDS: input_ids.reshape(-1, 1)}
        if ENCODER_ATTENTION_MASK in graph.inputs:
            feeds[ENCODER_ATTENTION_MASK] = self._mask
        if ENCODER_HIDDEN_STATES in graph.inputs:
            feeds[ENCODER_HIDDEN_STATES] = self._hidden
        if manifest.use_cache_branch:
            feeds[manifest.use_cache_branch] = np.array([not first])
        if LOGITS_ROWS in graph.inputs:  # a greedy head: logits for every row, as without one
            if self._all_rows[0] != self.rows:
                self._all_rows = np.array([self.rows], dtype=np.int64)
            feeds[LOGITS_ROWS] = self._all_rows
            feeds[GREEDY_BIAS] = graphs.no_bias
        if SEQLENS_K in graph.inputs:  # buffer states: positions written so far, and with this step's
            feeds[SEQLENS_K] = np.full(self.rows, self._step, dtype=np.int32)
            feeds[TOTAL_SEQUENCE_LENGTH] = np.array(self._step + 1, dtype=np.int32)
        wanted: list[str] = [LOGITS]
        into: dict[str, Any] = {}
        for state in manifest.states:
            if state.input_name in graph.inputs:
                value = self._states.get(state.input_name)
                if value is None and state.kind == "buffer":
                    self._allocate_buffers(graph)
                    value = self._states[state.input_name]
                feeds[state.input_name] = value if value is not None else self._empty(graph, state)
            output = state.output_name
            if output is None:  # given by the encoder, never emitted by a decoder
                continue
            if state.kind == "buffer":
                into[output] = feeds[state.input_name]  # written in place: input and output are one
            # A fixed state, once known, is never rebound: optimum's merged graph re-emits it each step.
            if output in graph.outputs and not (state.kind == "fixed" and state.input_name in self._states):
                wanted.append(output)
        if len(into) == len(wanted) - 1 and graphs.logits_sized:  # every state in place: the logits can be too
            into[LOGITS] = self._logits_buffer(graph)
        binding = self._bindings.get(graph.name)
        if binding is None:
            binding = self._bindings[graph.name] = Binding(graph)
        results = binding.run(feeds, wanted, host_outputs=(LOGITS,) if logits_on_host else (), into=into)
        for state in manifest.states:
            if state.output_name in results and state.kind != "buffer":
                self._states[state.input_name] = results[state.output_name]
                self._version += 1
        self._step += 1
        if (graph is graphs.decoder and graph.binds and SEQLENS_K in graph.inputs and LOGITS in into
                and len(into) == len(wanted) and not manifest.use_cache_branch):
            self._steady = self._pin_steady(binding, into[LOGITS])
        return results[LOGITS]

    def _pin_steady(self, binding: Binding, logits: Any) -> SteadyStep:
        """Bind the step's changing inputs to arrays of this call's own, for `_rerun`."""
        host = host_view(logits)
        scores = host[:, -1, :] if host is not None and host.dtype == np.float32 else None
        rows = self.rows
        positions = np.repeat(np.arange(self._capacity + 1, dtype=np.int32), rows).data  # made once per pin
        steady = SteadyStep(binding, np.zeros((rows, 1), dtype=np.int64), np.zeros(rows, dtype=np.int32),
                            np.zeros((), dtype=np.int32), logits, host, scores, self._version, positions)
        binding.pin({INPUT_IDS: steady.ids, SEQLENS_K: steady.seqlens, TOTAL_SEQUENCE_LENGTH: steady.total})
        return steady

    def _holds(self, steady: SteadyStep) -> bool:
        """Whether the next step can be `steady`'s: nothing but the ids and positions changed since."""
        return steady.version == self._version and self._step > 0

    def _rerun(self, steady: SteadyStep, input_ids: np.ndarray) -> None:
        """`_run` when nothing but the ids and the positions changed since the last step (measured on the
        t5-small shape, int8, batch 1: building the feeds anew was most of the loop's own time per step)."""
        if self._permuted:
            steady.ids[self._slots, 0] = input_ids
        elif input_ids.flags.c_contiguous and input_ids.dtype == np.int64:
            steady.ids.data.cast("B")[:] = input_ids.data.cast("B")  # a memcpy, no numpy call
        else:
            steady.ids[:, 0] = input_ids
        steady.write_positions(self._step)
        steady.binding.rerun()
        self._step += 1

    def select(self, rows: np.ndarray, shared: Shared | None = None) -> None:
        """Keep state rows `rows` ([new_rows] int64), in that order (shared: see DecoderStep.select; with
        every changing state in the buffer block, a beam reorder renames slots, `_reorder_slots`).

        Per-input tensors (encoder mask and hidden states, fixed cross-attention K/V) are identical
        across one input's beams, so a beam reorder that keeps every row within its input leaves
        them alone; only the growing and recurrent states are gathered every time, and when the row
        count stays (a beam reorder) only the rows that change are rewritten (`TensorOps.reorder`).
        """
        if shared is not None and self._block_holds_all and rows.shape[0] == self.rows:
            # A beam reorder within each input (what shared promises), every changing state in the
            # block: it is rewritten in place and no tensor becomes another object (the steady step stays
            # valid), so `_select`'s bookkeeping, a few dozen numpy and Python calls between two decoder
            # runs, is not needed.
            self._reorder_slots(rows, shared)
            return
        if rows.shape[0] == self.rows and np.array_equal(rows, np.arange(self.rows)):
            return
        if self._permuted:  # the rows' slots; after the gather, row i is in slot i again
            rows = self._slots[rows]
        before = self._held()
        self._select(rows)
        after = self._held()
        if len(before) != len(after) or any(a is not b for a, b in zip(before, after)):
            self._version += 1
        if rows.shape[0] == self._slots.shape[0]:
            self._slots[:] = np.arange(rows.shape[0])  # in place: the bound ranking reads it
        else:
            self._slots = np.arange(rows.shape[0], dtype=np.int64)
        self._slot_list, self._permuted = self._slots.tolist(), False

    def _reorder_slots(self, rows: np.ndarray, shared: Shared) -> None:
        """A beam reorder of the block without moving the rows that stay: each parent's first new row
        takes over its parent's slot, and only its other new rows (a parent that branched) are copied,
        into the slots of the rows no one continues (each into the one whose row shares the longest prefix
        with the parent), from the first position the two differ at (`shared`). Simulated on recorded
        t5-small beam 4 steps (batch 1 and 8), renaming copied a third of the positions that rewriting every
        row whose parent changed did. The slots of one input stay among that input's rows, so the
        per-input tensors need nothing."""
        assert self._block is not None
        batch_axis, seq_axis = self._block_axes
        assert seq_axis is not None  # a buffer state names its seq_axis (Manifest.check)
        beams = len(shared[0])
        parents, slots, common = rows.tolist(), self._slot_list, shared
        new = [-1] * len(parents)
        source: list[Any] = [slice(None)] * self._block.ndim
        target = list(source)
        for first in range(0, len(parents), beams):
            group = range(first, first + beams)
            continued: set[int] = set()
            for row in group:
                if parents[row] not in continued:
                    continued.add(parents[row])
                    new[row] = slots[parents[row]]
            free = [row for row in group if row not in continued]  # rows no one continues: their slots are free
            shared_here = common[first // beams]
            for row in group:
                if new[row] < 0:
                    parent = parents[row]
                    # the free slot whose row shares the longest prefix with the parent: the fewest positions to
                    # copy (the last of equals, as a plain pop() took)
                    prefixes = [shared_here[left - first][parent - first] for left in free]
                    start = max(prefixes)
                    left = free.pop(len(prefixes) - 1 - prefixes[::-1].index(start))
                    new[row] = slots[left]
                    if start < self._step:  # positions from start on differ: the parent's, into the free slot
                        source[1 + batch_axis], source[1 + seq_axis] = slots[parent], slice(start, self._step)
                        target[1 + batch_axis], target[1 + seq_axis] = new[row], slice(start, self._step)
                        self._block[tuple(target)] = self._block[tuple(source)]  # free and parent slots: apart
        self._slots[:] = new
        self._slot_list = new
        self._permuted = new != list(range(len(new)))

    def _held(self) -> list[Any]:
        """The tensors the decoder's binding reads, for `select` to tell whether one became another object."""
        return [self._mask, self._hidden, self._block, *self._states.values()]

    def _select(self, rows: np.ndarray) -> None:
        ops = self._graphs.ops
        input_of_row = self._input_of_row[rows]
        same_inputs = np.array_equal(input_of_row, self._input_of_row)
        self._input_of_row = input_of_row
        if not same_inputs:
            self._mask = ops.take(self._mask, rows, 0)
            if self._hidden is not None:
                self._hidden = ops.take(self._hidden, rows, 0)
        if self._block is not None:
            self._select_block(rows, same_inputs)
        moving = [s for s in self._graphs.manifest.states
                  if self._states.get(s.input_name) is not None and (s.kind != "fixed" or not same_inputs)
                  and not (self._block is not None and s.input_name in self._block_names)]
        # buffers are this call's own (allocated in _buffer); other states came from onnxruntime
        in_place = same_inputs and self._own_memory([s.input_name for s in moving if s.kind != "buffer"])
        changed = np.flatnonzero(rows != np.arange(rows.shape[0])) if in_place else None  # rows that move
        for state in moving:
            value = self._states[state.input_name]
            # a buffer holds `self._step` written positions; the rest of it is never read
            written = (state.seq_axis, self._step) if state.kind == "buffer" and state.seq_axis is not None else None
            if changed is not None:
                self._states[state.input_name] = ops.reorder(value, rows, state.batch_axis, written, changed)
            else:
                self._states[state.input_name] = ops.take(value, rows, state.batch_axis, written)

    def _own_memory(self, names: list[str]) -> bool:
        """Whether the named states may be rewritten in place: each in host memory that no other live
        tensor of this call starts at (onnxruntime may hand out one buffer as two outputs, or an
        output that aliases an input)."""
        if not names:
            return True
        starts = []
        for value in [*self._states.values(), self._mask, self._hidden]:
            view = host_view(value) if value is not None else None
            if view is not None and view.size:
                starts.append(view.__array_interface__["data"][0])
        mine = [host_view(self._states[name]) for name in names]
        return all(view is not None for view in mine) and len(starts) == len(set(starts))

    def _logits_buffer(self, graph: Graph) -> Any:
        """This call's logits tensor, [rows, 1, vocab], made again when the row count changes."""
        shape = [self.rows, 1, self._graphs.vocab_size]
        if self._logits is None or self._logits_rows != self.rows:
            dtype = graph.outputs[LOGITS].dtype
            if self._graphs.config.device == "cpu":  # every run writes all of it: no need to zero it
                self._logits_memory = self._graphs.spare.empty(shape, dtype)
                self._logits = device_array(self._logits_memory, "cpu")
            else:
                self._logits = self._graphs.ops.new_buffer(shape, dtype)
            self._logits_rows = self.rows
        return self._logits

    def release(self) -> None:
        """The call is over: hand its host buffer block, logits and repeated encoder outputs to the next
        call (`SpareArrays`). The decoder must not run again. Nothing the call returned is a view of them."""
        self._states.clear()
        self._bindings.clear()
        self._steady = self._candidates = self._logits = self._head = self._hidden = None
        self._block_names = []
        block, self._block = self._block, None
        logits, self._logits_memory = self._logits_memory, None
        encoded, self._encoded_memory = self._encoded_memory, None
        # one call each, by the one local name (SpareArrays.give counts the references)
        if block is not None:
            self._graphs.spare.give(block)
        if logits is not None:
            self._graphs.spare.give(logits)
        if encoded is not None:
            self._graphs.spare.give(encoded)

    def _allocate_buffers(self, graph: Graph) -> None:
        """`buffer` states: `rows` on the batch axis, this call's capacity on the sequence axis.

        In host memory, buffers of one shape and dtype (every layer's K and V) are slices of one array
        [n, rows, ...], so that a beam reorder moves them all with one copy (`_select_block`): measured
        at beam 4, batch 1, one reorder per buffer was half of the loop's own time per step. That array
        is not zeroed: a step attends to the positions before it, each written by an earlier step, and
        nothing else reads a buffer (reorders copy written positions only); zeroing 1.6 MB at t5-small
        batch 1 was ~100 us of the call's first step, on caches the encoder run had flushed. So it may
        be the memory of an earlier call's block (`SpareArrays`, handed back by `release`)."""
        states = [s for s in self._graphs.manifest.states if s.kind == "buffer" and s.input_name in graph.inputs]
        specs = [(graph.inputs[s.input_name], s) for s in states]
        shapes = {(tuple(spec.shape_with(s.sizes(self.rows, self._capacity))), spec.dtype, s.batch_axis, s.seq_axis)
                  for spec, s in specs}
        if self._graphs.config.device == "cpu" and len(shapes) == 1:
            shape, dtype, self._block_axes = next(iter(shapes))[0], next(iter(shapes))[1], next(iter(shapes))[2:]
            self._block = self._graphs.spare.empty((len(states), *shape), dtype)
            self._block_names = [s.input_name for s in states]
            self._block_holds_all = all(s.kind == "fixed" or s.input_name in self._block_names
                                        for s in self._graphs.manifest.states)
            self._wrap_block()
            return
        for spec, state in specs:
            self._states[state.input_name] = self._graphs.ops.new_buffer(
                spec.shape_with(state.sizes(self.rows, self._capacity)), spec.dtype)

    def _wrap_block(self) -> None:
        """Each buffer state, an OrtValue over its slice of the block (no copy)."""
        assert self._block is not None
        for index, name in enumerate(self._block_names):
            self._states[name] = device_array(self._block[index], "cpu")

    def _select_block(self, rows: np.ndarray, same_inputs: bool) -> None:
        """`select` for the buffers of the block, written positions only: in place for a reorder, into a
        new block when the row count changes (not zeroed either, as `_allocate_buffers` says why)."""
        assert self._block is not None
        batch_axis, seq_axis = self._block_axes
        assert seq_axis is not None  # a buffer state names its seq_axis (Manifest.check)
        part: list[Any] = [slice(None)] * self._block.ndim
        part[1 + seq_axis] = slice(0, self._step)
        source, target = list(part), list(part)
        if same_inputs and rows.shape[0] == self._block.shape[1 + batch_axis]:
            changed = np.flatnonzero(rows != np.arange(rows.shape[0]))
            source[1 + batch_axis], target[1 + batch_axis] = rows[changed], changed
            self._block[tuple(target)] = self._block[tuple(source)]  # the right side is a copy
            return
        shape = list(self._block.shape)
        shape[1 + batch_axis] = rows.shape[0]
        block = self._graphs.spare.empty(shape, self._block.dtype)
        source[1 + batch_axis] = rows
        block[tuple(part)] = self._block[tuple(source)]
        self._block = block
        self._wrap_block()

    def _empty(self, graph: Graph, state: StateTensor) -> np.ndarray:
        """A zero-length state for step 0: `rows` on the batch axis, 0 on the sequence axis."""
        spec = graph.inputs[state.input_name]
        return np.zeros(spec.shape_with(state.sizes(self.rows, 0)), dtype=spec.dtype)


def _in_slots(values: np.ndarray, slots: np.ndarray) -> np.ndarray:
    """values [rows, ...] with row i moved to slots[i]."""
    placed = np.empty_like(values)
    placed[slots] = values
    return placed
