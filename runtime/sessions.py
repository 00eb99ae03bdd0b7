"""Execution providers, session options and device-resident state. The only module that imports onnxruntime.

The decoding loop calls `Graph.run(feeds, outputs)` and never branches on the device. By default
every graph runs with IO binding: outputs stay where onnxruntime put them, as `OrtValue`s (in its
memory arena on the CPU, on the GPU with CUDA), and are bound as inputs of the next step without a
copy; outputs named in `host_outputs` come back as numpy (on the CPU a view of the OrtValue, no copy).
Measured on the CPU (t5-small shape, 32 rows, past 64): a plain `InferenceSession.run` turns every
output into a fresh numpy array, and for the self-attention cache that copy (into newly mapped pages)
cost more than the graph's own Concat of it. `io_binding=False` keeps plain runs (numpy in and out).

`host_view` and `device_array` are the only other places a value's location matters; the helper
graphs of runtime/tensor_ops.py use them.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import DTypeLike

from runtime.errors import ExportDirError, ProviderUnavailableError, first_line

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
PROVIDER_CHOICES = ("auto", "cpu", "cuda")

_GRAPHS_DIR = Path(__file__).parent / "graphs"  # tiny committed helper graphs (see make_select_rows.py)

# onnxruntime's element type names (NodeArg.type, OrtValue.data_type()) -> numpy dtypes.
ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
    "tensor(int8)": np.int8,
}

# Libraries the CUDA provider loads: onnxruntime-gpu 1.31 is built for CUDA 13 (older ones for 12).
_CUDA_LIBRARIES = {
    "CUDA runtime": ("libcudart.so.13", "libcudart.so.12"),
    "cuBLAS": ("libcublasLt.so.13", "libcublasLt.so.12"),
    "cuDNN": ("libcudnn.so.9",),
}


@dataclass(frozen=True)
class IOSpec:
    """One graph input or output as the session declares it."""

    name: str
    shape: tuple[int | str | None, ...]  # ints are fixed dims, strings symbolic, None unknown
    dtype: type

    def shape_with(self, sizes: dict[int, int]) -> list[int]:
        """The declared shape with `sizes` ({axis: size}) on those axes, every other axis fixed.

        Raises:
            ExportDirError: an axis not in `sizes` has no fixed size.
        """
        shape = []
        for axis, dim in enumerate(self.shape):
            size = sizes.get(axis, dim)
            if not isinstance(size, int):
                raise ExportDirError(f"{self.name} has no fixed size on axis {axis} (its shape is {list(self.shape)}); "
                                     "re-export the model")
            shape.append(size)
        return shape


def _cuda_missing_reason() -> str | None:
    """Say why the CUDA provider cannot start (the missing package or library), or None if nothing is missing.

    On Linux the libraries are probed before any CUDA session is tried, so a CPU-only machine gets our
    one line instead of onnxruntime's log; elsewhere only a real session can tell.
    """
    if CUDA not in ort.get_available_providers():
        return "this onnxruntime build has no CUDA provider; install onnxruntime-gpu (and uninstall onnxruntime)"
    _preload_cuda_libraries()
    if not sys.platform.startswith("linux"):
        return None
    missing = []
    for what, names in _CUDA_LIBRARIES.items():
        for lib in names:
            try:
                ctypes.CDLL(lib)
                break
            except OSError:
                continue
        else:
            missing.append(f"{what} ({' or '.join(names)})")
    if missing:
        return "the CUDA provider cannot find " + ", ".join(missing) + \
            f"; install the CUDA and cuDNN versions onnxruntime-gpu {ort.__version__} was built for " \
            "and put them on the library path"
    return None


def _preload_cuda_libraries() -> None:
    """Let onnxruntime (>= 1.21) load CUDA/cuDNN from pip's nvidia-* packages, if they are installed.

    It prints a line per library it cannot find; that is our message to give, so it is swallowed.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    # best effort: a real session decides whether CUDA works
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
            contextlib.suppress(Exception):
        preload()


@dataclass(frozen=True)
class ProviderConfig:
    """Which provider to use and how many threads; cheap to rebuild in another process."""

    provider: str  # "cpu" or "cuda" (resolved, never "auto")
    threads: int | None = None  # intra-op threads; None: onnxruntime's default (all cores)
    io_binding: bool | None = None  # None: on (states stay in onnxruntime's memory); False: plain numpy runs

    @property
    def providers(self) -> list[str]:
        return [CUDA, CPU] if self.provider == "cuda" else [CPU]

    @property
    def binds(self) -> bool:
        return self.io_binding is not False

    @property
    def device(self) -> str:
        return "cuda" if self.provider == "cuda" else "cpu"


def resolve_provider(provider: str) -> tuple[str, str]:
    """Turn "auto" | "cpu" | "cuda" into "cpu" or "cuda", and say why.

    "cuda" where CUDA cannot run raises; "auto" picks CUDA only when a session really starts on it.

    Raises:
        ProviderUnavailableError: "cuda" requested but unusable, or an unknown provider name.
    """
    if provider not in PROVIDER_CHOICES:
        raise ProviderUnavailableError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDER_CHOICES)}")
    if provider == "cpu":
        return "cpu", "CPU provider (requested)"
    reason = _cuda_missing_reason()
    if reason is None:
        if _starts_on_cuda():
            return "cuda", "CUDA provider" + (" (auto: CUDA works here)" if provider == "auto" else " (requested)")
        reason = ("the CUDA provider failed to start (no GPU visible, or a driver/library mismatch; "
                  "see onnxruntime's log)")
    if provider == "cuda":
        raise ProviderUnavailableError(f"CUDA requested but unavailable: {reason}; or pass --provider cpu")
    return "cpu", f"CPU provider (auto: CUDA unavailable: {reason})"


def _starts_on_cuda() -> bool:
    """Start a session on the tiniest graph we have (a Gather) and see whether CUDA took it."""
    model = _GRAPHS_DIR / "select_rows_float32_axis0.onnx"
    options = ort.SessionOptions()
    options.log_severity_level = 4  # the fallback warning is our message to give, not onnxruntime's
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(str(model), options, providers=[CUDA, CPU])
    except Exception:  # noqa: BLE001 - any failure here means "not usable"; the caller explains why
        return False
    return CUDA in session.get_providers()


class Graph:
    """One ONNX graph in a session, with its declared IO. Thread-safe: holds no per-call state."""

    def __init__(self, path: Path, config: ProviderConfig, *, spinning: bool = True, threads: int | None = None):
        """threads: intra-op threads of this graph alone (default: the config's)."""
        options = ort.SessionOptions()
        threads = threads if threads is not None else config.threads
        if threads is not None:
            options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        if not spinning:
            # A session run once per call (the encoder) must not keep its thread pool spinning while
            # the decoder runs: measured in DESIGN.md, spinning there takes a core from the decoder.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = _new_session(path, options, config.providers)
        if config.provider == "cuda" and CUDA not in self.session.get_providers():
            raise ProviderUnavailableError(f"CUDA requested but {path.name} did not start on it: "
                                           f"{_cuda_missing_reason() or 'see onnxruntime log'}; or pass --provider cpu")
        self.name = path.name
        self.binds = config.binds
        self.device = config.device
        self.inputs = {i.name: _spec(i) for i in self.session.get_inputs()}
        self.outputs = {o.name: _spec(o) for o in self.session.get_outputs()}

    def run(self, feeds: dict[str, Any], output_names: Iterable[str], host_outputs: Iterable[str] = (),
            into: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run the graph. feeds: numpy arrays, or OrtValues an earlier run returned.

        Without IO binding every output is a numpy array. With it, names in host_outputs come back as
        numpy (a view of onnxruntime's buffer on the CPU) and the rest as OrtValues where the
        provider put them, ready to be fed back without a copy.
        into: outputs written into given OrtValues (always with IO binding): a graph that updates a
        buffer in place gets the same OrtValue as its input and its output.
        """
        output_names = list(output_names)
        if not self.binds and not into:
            return self.run_plain(feeds, output_names)
        return Binding(self).run(feeds, output_names, host_outputs, into)

    def run_plain(self, feeds: dict[str, Any], output_names: list[str]) -> dict[str, Any]:
        """Run without IO binding: host arrays in (a numpy view of a CPU OrtValue reads its memory, no
        copy), numpy arrays out. For a one-off run of a small graph on the CPU, cheaper than binding."""
        return dict(zip(output_names, self.session.run(output_names, feeds)))


class Binding:
    """A graph's IO binding kept across the runs of one call (a decoder's steps): a value is bound again
    only when it is another object than last time, so the states a step leaves in place (buffers, fixed
    cross-attention K/V, the encoder mask) are bound once per call. Measured on the t5-small shape at
    batch 1: binding every input and output anew each step was most of the loop's time outside the graph.

    Holds the values it bound (onnxruntime keeps no reference to a numpy input). Not thread-safe: one
    call's.
    """

    def __init__(self, graph: Graph):
        self.graph = graph
        self._binding = graph.session.io_binding()
        self._run = _runner(graph.session, self._binding)
        self._inputs: dict[str, Any] = {}
        self._outputs: dict[str, Any] = {}  # name -> the OrtValue written into, or the device name
        self._output_order: list[str] = []  # get_outputs() returns the bound outputs in binding order

    def run(self, feeds: dict[str, Any], output_names: list[str], host_outputs: Iterable[str] = (),
            into: dict[str, Any] | None = None) -> dict[str, Any]:
        """As `Graph.run`, with IO binding."""
        into = into or {}
        for name, value in feeds.items():
            if self._inputs.get(name) is not value:
                self._bind_input(name, value)
        host = set(host_outputs)
        if output_names != self._output_order:  # another set of outputs (a first step): bind them all anew
            self._binding.clear_binding_outputs()
            self._outputs, self._output_order = {}, list(output_names)
        for name in output_names:
            target = into.get(name, "cpu" if name in host else self.graph.device)
            if self._outputs.get(name) is not target:
                if isinstance(target, str):
                    self._binding.bind_output(name, target)
                else:
                    self._binding.bind_ortvalue_output(name, target)
                self._outputs[name] = target
        self._run()
        # An output bound by device name now holds this run's value, and onnxruntime would write the next
        # run's into it: bind it anew next time, as that value may be fed back (an LSTM's h) or still read.
        self._outputs = {name: target for name, target in self._outputs.items() if not isinstance(target, str)}
        if all(name in into for name in output_names):  # nothing new to collect
            values = [into[name] for name in output_names]
        else:
            values = self._binding.get_outputs()
        # plain runs hand back numpy, whatever was bound
        return {name: value.numpy() if name in host or not self.graph.binds else value
                for name, value in zip(output_names, values)}

    def _bind_input(self, name: str, value: Any) -> None:
        if isinstance(value, ort.OrtValue):
            self._binding.bind_ortvalue_input(name, value)
        else:
            self._binding.bind_cpu_input(name, np.ascontiguousarray(value))
        self._inputs[name] = value

    def pin(self, arrays: dict[str, np.ndarray]) -> None:
        """Bind host arrays by their memory: what the caller writes into them, the next `rerun` reads."""
        for name, array in arrays.items():
            value = device_array(array, "cpu")  # wraps the array's memory
            self._binding.bind_ortvalue_input(name, value)
            self._inputs[name] = value

    def derived(self, pins: dict[str, np.ndarray], outputs: dict[str, Any]) -> Binding:
        """Another binding of this graph with this one's inputs, except `pins` (host arrays bound by their
        memory, as `pin`), and its outputs, except `outputs` (name -> an OrtValue written into): for a run
        that differs from this one's steps in a few tensors (a greedy head's), ready for `rerun`."""
        other = Binding(self.graph)
        for name, value in self._inputs.items():
            if name not in pins:
                other._bind_input(name, value)
        other.pin(pins)
        targets = {name: target for name, target in self._outputs.items() if name not in outputs} | outputs
        for name, target in targets.items():
            other._binding.bind_ortvalue_output(name, target)
        other._outputs, other._output_order = targets, list(targets)
        return other

    def rerun(self) -> None:
        """Run again with everything as bound: valid after a `run` whose every output went `into` a tensor
        of the caller's (nothing bound by device name), the changing inputs `pin`ned."""
        self._run()


def _runner(session: ort.InferenceSession, binding: ort.IOBinding) -> Callable[[], None]:
    """`session.run_with_iobinding(binding)`, as the one call into onnxruntime's C++ it makes for a CPU or
    CUDA session. onnxruntime 1.31's Python wrapper first asks the C++ whether WebGPU graph capture is on,
    every run (~4 us of a decoder step's ~12 us of Python around the run, warm; more between two runs, on
    caches the graph flushed). The wrapper is kept where capture is on, where its private attributes are
    missing, and where something set its own `run_with_iobinding` on the session (a profiler's timing:
    bench/breakdown.py)."""
    inner, io = getattr(session, "_sess", None), getattr(binding, "_iobinding", None)
    check = getattr(inner, "is_webgpu_graph_capture_enabled", None)
    if "run_with_iobinding" in vars(session) or inner is None or io is None or check is None or check():
        return lambda: session.run_with_iobinding(binding)
    run = inner.run_with_iobinding
    return lambda: run(io, None)


@dataclass(frozen=True)
class GraphIO:
    """A graph's declared inputs and outputs, read without running it."""

    name: str
    inputs: dict[str, IOSpec]
    outputs: dict[str, IOSpec]


def read_graph_io(path: Path) -> GraphIO:
    """Read a graph's IO names, shapes and types (CPU session, no optimisation).

    Raises:
        ExportDirError: the file is missing or not a loadable ONNX graph.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # reading IO only: onnxruntime's load-time notes are noise here
    session = _new_session(path, options, [CPU])
    return GraphIO(path.name, {i.name: _spec(i) for i in session.get_inputs()},
                   {o.name: _spec(o) for o in session.get_outputs()})


def _new_session(path: Path, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    """Load a graph, turning a missing or unloadable file into one ExportDirError line."""
    if not path.is_file():
        raise ExportDirError(f"graph {path.name!r} is missing from {str(path.parent)!r}; re-export the model")
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as err:  # noqa: BLE001 - onnxruntime raises several unrelated types for a bad file
        raise ExportDirError(f"cannot load graph {str(path)!r}: {first_line(err)}; re-export the model") from None


def _spec(arg: Any) -> IOSpec:
    dtype = ORT_TYPES.get(arg.type)
    if dtype is None:
        raise ExportDirError(f"graph input/output {arg.name!r} has unsupported type {arg.type}; re-export the model")
    return IOSpec(arg.name, tuple(arg.shape), dtype)


def host_view(value: Any) -> np.ndarray | None:
    """A numpy view of `value`'s memory when it is in host memory (a numpy array, or an OrtValue on the
    CPU); None for a value on a device. Writing into the view writes into the value."""
    if not isinstance(value, ort.OrtValue):
        return value
    return value.numpy() if value.device_name().lower() == "cpu" else None


def device_array(value: np.ndarray, device: str) -> Any:
    """`value` as an OrtValue on `device` ("cpu": wraps the array's memory, no copy; "cuda": one upload)."""
    if device == "cpu":
        return _host_wrapper()(np.ascontiguousarray(value))
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), device, 0)


@functools.cache
def _host_wrapper() -> Callable[[np.ndarray], Any]:
    """An OrtValue over a contiguous host array's memory. onnxruntime 1.31's `ortvalue_from_numpy` looks
    the device up by name on every call (~2 us warm, ~10 cold: a call's first decoder step wraps a dozen
    buffers on caches the encoder run has flushed); this makes the C device once and builds the same
    Python OrtValue (holding the array) from it. onnxruntime's own function where its private names are
    missing."""
    try:
        from_numpy = ort.capi._pybind_state.OrtValue.ortvalue_from_numpy  # noqa: SLF001
        c_device = ort.OrtDevice.make("cpu", 0)._get_c_device()  # noqa: SLF001
    except AttributeError:
        return ort.OrtValue.ortvalue_from_numpy
    return lambda array: ort.OrtValue(from_numpy(array, c_device), array)


def new_buffer(shape: list[int], dtype: DTypeLike, device: str) -> Any:
    """A zeroed OrtValue of `shape` on `device` that graphs may write in place (see Graph.run's `into`).

    On the CPU it wraps a numpy array: pages are mapped as they are first written, so a buffer sized
    for the longest output costs memory only for the positions generated."""
    return device_array(np.zeros(shape, dtype=dtype), device)


def value_dtype(value: Any) -> np.dtype:
    """The element type of a numpy array or OrtValue."""
    if isinstance(value, ort.OrtValue):
        return np.dtype(ORT_TYPES[value.data_type()])
    return value.dtype
