"""Measurements taken inside a worker process: peak resident memory, GPU memory, latency statistics."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Start a new peak-RSS window (Linux: VmHWM falls back to the current RSS). False where unsupported."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak resident set size of this process, in MiB: since the last reset_peak_rss() on Linux, else since start."""
    if _STATUS.is_file():
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, kB elsewhere


def gpu_memory_mb(device_used_before: float | None) -> tuple[float | None, str | None]:
    """GPU memory this process holds now, in MiB, and how it was measured.

    onnxruntime's CUDA arena, torch's caching allocator and CTranslate2's allocator all keep what they
    took, so taken right after a run this is that run's high-water mark (CUDA context included).
    "process": nvidia-smi's figure for this PID. "device delta": where nvidia-smi cannot see this
    PID (a container's PID namespace), the device's used memory minus `device_used_before` (taken
    before the engine loaded), which counts other processes' changes too. (None, None): no nvidia-smi.
    """
    apps = _nvidia_smi("--query-compute-apps=pid,used_memory")
    if apps is None:
        return None, None
    mine = [float(fields[1]) for fields in (line.split(",") for line in apps) if len(fields) == 2
            and fields[0].strip() == str(os.getpid())]
    if mine:
        return sum(mine), "process"
    used = device_used_mb()
    if used is None or device_used_before is None:
        return None, None
    return used - device_used_before, "device delta"


def device_used_mb() -> float | None:
    """Memory in use on GPU 0, all processes together, in MiB (None without nvidia-smi)."""
    lines = _nvidia_smi("--query-gpu=memory.used")
    return float(lines[0]) if lines else None


def _nvidia_smi(query: str) -> list[str] | None:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", query, "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return [line.strip() for line in out.splitlines() if line.strip()]


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(wall s, busy CPU s of the whole machine, CPU s of this process and its finished children); Linux only."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    ours = os.times()
    return (time.monotonic(), (user + nice + system + irq + softirq + steal) / ticks,
            ours.user + ours.system + ours.children_user + ours.children_system)


def others_cpu_share(start: tuple[float, float, float] | None, end: tuple[float, float, float] | None) -> float | None:
    """Share of the machine's CPU capacity that other processes used between two snapshots (0..1).

    The benchmark's workers are children of this process, waited for, so their CPU time is ours.
    """
    if start is None or end is None:
        return None
    wall, busy, ours = (b - a for a, b in zip(start, end))
    capacity = wall * (os.cpu_count() or 1)
    return max(0.0, busy - ours) / capacity if capacity > 0 else None


def latency_stats(seconds: list[float]) -> dict[str, float]:
    """Median, p10 and p90 (linear interpolation, numpy's default) of per-call wall times, in ms."""
    ms = np.asarray(seconds) * 1000
    return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)),
            "p90_ms": float(np.percentile(ms, 90)),
            "min_ms": float(ms.min()), "max_ms": float(ms.max())}
