"""The parent's side of bench/worker.py: a worker process, asked one request at a time.

A reply is awaited with a deadline, so a hung engine costs one case, not the run; a worker that
exits or breaks the protocol raises WorkerFailed with the last line it wrote to stderr (its whole
stderr is kept in a log file beside the results).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPLY_TIMEOUT_S = 3600.0  # the slowest call of the full matrix (eager, beam 4 x batch 32) is minutes, not an hour
CLOSE_TIMEOUT_S = 60.0


class WorkerFailed(Exception):
    """A request failed: the worker answered with an error (alive=True), or it exited or hung (alive=False)."""

    def __init__(self, message: str, traceback: str | None = None, alive: bool = True):
        super().__init__(message)
        self.traceback = traceback
        self.alive = alive


class WorkerProcess:
    """One `python -m bench.worker` child with `threads` threads allowed, its stderr in `log_file`."""

    def __init__(self, threads: int, log_file: Path):
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                   OPENBLAS_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
                   TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
        self.log_file = log_file
        self._log = log_file.open("w", encoding="utf-8")
        self._proc = subprocess.Popen([sys.executable, "-m", "bench.worker"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._log, env=env, bufsize=0)
        self._pending = b""  # bytes read past the last reply line (none while the protocol is kept)
        self.dead: str | None = None  # why it can answer no more

    def call(self, op: str, timeout_s: float = REPLY_TIMEOUT_S, **fields: Any) -> dict[str, Any]:
        """Send one request ({"op": op, **fields}) and return the worker's reply.

        Raises:
            WorkerFailed: an error reply (the worker lives on), or the worker is gone or did not answer
                within timeout_s (then it is killed).
        """
        self.send(op, **fields)
        return self.receive(timeout_s)

    def send(self, op: str, **fields: Any) -> None:
        """The first half of `call`: several workers can then work on their requests at once (loading)."""
        if self.dead:
            raise WorkerFailed(self.dead, alive=False)
        try:
            self._proc.stdin.write((json.dumps({"op": op, **fields}) + "\n").encode("utf-8"))
            self._proc.stdin.flush()
        except OSError:  # the worker has exited: its stdin pipe is closed
            self._died(f"worker exited with status {self._proc.wait()}")

    def receive(self, timeout_s: float = REPLY_TIMEOUT_S) -> dict[str, Any]:
        """The second half of `call`: the reply to the request sent last."""
        if self.dead:
            raise WorkerFailed(self.dead, alive=False)
        line = self._read_line(timeout_s)
        try:
            reply = json.loads(line)
        except json.JSONDecodeError:
            self._died(f"worker broke the protocol: {line[:200]!r}")
        if "error" in reply:
            raise WorkerFailed(reply["error"], reply.get("traceback"))
        return reply

    def _read_line(self, timeout_s: float) -> str:
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout_s
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0:
                self._proc.kill()
                self._proc.wait()
                self._died(f"no answer within {timeout_s:.0f} s; killed")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:  # end of file: the worker is gone (crashed, or killed for memory)
                    self._died(f"worker exited with status {self._proc.wait()}")
                self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line.decode("utf-8")

    def _died(self, why: str) -> None:
        tail = self.stderr_tail()
        self.dead = f"{why}: {tail}" if tail else why
        raise WorkerFailed(self.dead, alive=False)

    def stderr_tail(self) -> str:
        self._log.flush()
        lines = [line for line in self.log_file.read_text(encoding="utf-8", errors="replace").splitlines()
                 if line.strip()]
        return lines[-1].strip()[:400] if lines else ""

    def end_input(self) -> None:
        """Tell the worker to exit (end of its input), without waiting: see `close`."""
        with contextlib.suppress(OSError):
            self._proc.stdin.close()

    def close(self) -> None:
        """End the worker and wait for it, killing it if it does not exit in time."""
        self.end_input()
        if self._proc.poll() is None:
            try:
                self._proc.wait(timeout=CLOSE_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc.stdout.close()
        self._log.close()
        self.dead = self.dead or "closed"
