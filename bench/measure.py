"""Measurements taken inside a worker process: peak resident memory, GPU memory, latency statistics."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
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


def gpu_memory_mb(pid: int | None = None) -> float | None:
    """GPU memory this process holds now (all its CUDA allocations and its context), in MiB; None if unknown.

    onnxruntime's CUDA arena, torch's caching allocator and CTranslate2's allocator all keep what they
    took, so taken right after a run this is that run's high-water mark.
    """
    pid = os.getpid() if pid is None else pid
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    used = [float(fields[1]) for fields in (line.split(",") for line in out.splitlines())
            if len(fields) == 2 and fields[0].strip() == str(pid)]
    return sum(used) if used else None


def latency_stats(seconds: list[float]) -> dict[str, float]:
    """Median and p90 (linear interpolation, numpy's default) of per-call wall times, in ms."""
    ms = np.asarray(seconds) * 1000
    return {"median_ms": float(np.median(ms)), "p90_ms": float(np.percentile(ms, 90)),
            "min_ms": float(ms.min()), "max_ms": float(ms.max())}
