"""The dynamic batcher: a queue of validated requests and one worker thread that runs them in batches.

`Batcher` is the `GenerationBackend` of `s2s-serve` (see serve/backend.py). A request waits in the
queue; the worker takes the oldest one and, until `max_wait_ms` after that request arrived, gathers
the queued requests that may share its generate call (`generation.batch_key`), up to
`max_batch_size` requests and `max_batch_tokens` padded tokens, then runs them together
(`generation.run_batch`). Requests that arrive while a batch runs wait for the next one; the oldest
request always goes first, so no key starves. Greedy rows that finish leave the running batch (the
search drops them); a request whose client left leaves the queue (and its size metric) at once or,
while its batch runs, the batch at the next step (beam search cannot stop early: its answer is
discarded).

Padded tokens of a batch: rows x (longest input + largest max_new_tokens), rows counting one per
beam; it bounds the encoder input and the decoder's cache together. A request that alone exceeds
the budget is refused at submission (422), as TGI refuses one over its total-token limit.

Events cross from the worker thread to the asyncio loop with `loop.call_soon_threadsafe`; the
batcher never parses JSON and the app never touches the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Hashable
from dataclasses import dataclass

from runtime import Model
from serve.backend import GenerationResult, Token
from serve.detokenize import TokenTexts
from serve.generation import Event, Job, batch_key, batch_rows, run_batch
from serve.metrics import ServerMetrics
from serve.schema import GenerateRequest, ServeError

log = logging.getLogger("serve.batcher")


@dataclass(frozen=True)
class BatchLimits:
    max_batch_size: int = 32  # requests per generate call
    max_batch_tokens: int = 32768  # padded tokens per call (see the module docstring)
    max_wait_ms: float = 5.0  # how long the oldest queued request waits for company

    def __post_init__(self):
        for name in ("max_batch_size", "max_batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")


@dataclass(eq=False)
class _Queued:
    job: Job
    key: Hashable
    rows: int
    source_tokens: int
    new_tokens: int
    arrived: float  # time.monotonic()


def request_tokens(request: GenerateRequest) -> int:
    """Padded tokens one request takes in a batch of its own."""
    return batch_rows(request) * (len(request.input_ids) + request.max_new_tokens)


class Batcher:
    """Queue + worker thread over one model. `start()` before serving, `close()` after (drains the queue)."""

    def __init__(self, model: Model, limits: BatchLimits = BatchLimits(), metrics: ServerMetrics | None = None):
        self.model = model
        self.limits = limits
        self.metrics = metrics
        self.texts = TokenTexts(model)
        self._queue: deque[_Queued] = deque()
        self._lock = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="s2s-batcher", daemon=True)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def close(self, timeout: float | None = None) -> None:
        """Stop taking requests, run what is queued, and join the worker."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- GenerationBackend ----------------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> GenerationResult:
        queued, events = self._submit(request)
        try:
            while True:
                event = await events.get()
                if isinstance(event, GenerationResult):
                    return event
                if isinstance(event, ServeError):
                    raise event
        finally:
            self._leave(queued)

    async def generate_stream(self, request: GenerateRequest) -> AsyncIterator[Token | GenerationResult]:
        queued, events = self._submit(request)
        try:
            while True:
                event = await events.get()
                if isinstance(event, ServeError):
                    raise event
                yield event
                if isinstance(event, GenerationResult):
                    return
        finally:
            self._leave(queued)

    # -- queue ----------------------------------------------------------------------------------------
    def _submit(self, request: GenerateRequest) -> tuple[_Queued, asyncio.Queue[Event]]:
        needed = request_tokens(request)
        if needed > self.limits.max_batch_tokens:
            raise ServeError.validation(f"this request needs {needed} padded tokens ({batch_rows(request)} row(s) x "
                                        f"({len(request.input_ids)} input + {request.max_new_tokens} new tokens)), "
                                        f"more than --max-batch-tokens {self.limits.max_batch_tokens}")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:  # called from the worker thread
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits for this answer any more
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(request, emit)
        queued = _Queued(job, batch_key(request), batch_rows(request), len(request.input_ids),
                         request.max_new_tokens, time.monotonic())
        with self._lock:
            if self._closing:
                raise ServeError("the server is shutting down", "unavailable", 503)
            self._queue.append(queued)
            self._set_queue_size()
            self._lock.notify_all()
        return queued, events

    def _leave(self, queued: _Queued) -> None:
        """The request is answered, failed, or its client left: a no-op for the first two; else its rows
        stop at the next step of a running batch, and it leaves the queue if it still waits there."""
        queued.job.cancelled = True
        with self._lock:
            if queued in self._queue:  # by identity (eq=False); the queue holds at most the requests in flight
                self._queue.remove(queued)
                self._lock.notify_all()  # the batch being gathered may have changed
            self._set_queue_size()

    def _set_queue_size(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_size.set(len(self._queue))

    def _next_batch(self) -> list[_Queued] | None:
        """Block until a batch is due; None once closing with nothing queued."""
        with self._lock:
            while True:
                while self._queue and self._queue[0].job.cancelled:  # its _leave is on its way
                    self._queue.popleft()
                if not self._queue:
                    if self._closing:
                        return None
                    self._lock.wait()
                    continue
                first = self._queue[0]  # again after each wait: the oldest request may have left
                batch = self._gather(first)
                remaining = first.arrived + self.limits.max_wait_ms / 1000 - time.monotonic()
                # full: at the size limit, or a compatible request is queued that the token budget left out
                full = len(batch) >= self.limits.max_batch_size or len(batch) < self._compatible_count(first)
                if full or remaining <= 0 or self._closing:
                    break
                self._lock.wait(remaining)
            for item in batch:
                self._queue.remove(item)
            self._set_queue_size()
            return batch

    def _gather(self, first: _Queued) -> list[_Queued]:
        """The oldest request and the queued ones that fit with it, oldest first."""
        batch, rows, source, new = [], 0, 0, 0
        for item in self._queue:
            if item.key != first.key or item.job.cancelled:
                continue
            cost = (rows + item.rows) * (max(source, item.source_tokens) + max(new, item.new_tokens))
            if batch and cost > self.limits.max_batch_tokens:
                continue
            batch.append(item)
            rows, source, new = rows + item.rows, max(source, item.source_tokens), max(new, item.new_tokens)
            if len(batch) == self.limits.max_batch_size:
                break
        return batch

    def _compatible_count(self, first: _Queued) -> int:
        return sum(1 for item in self._queue if item.key == first.key and not item.job.cancelled)

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            jobs = [item.job for item in batch]
            started = time.monotonic()
            run_batch(self.model, self.texts, jobs)
            if self.metrics is not None:
                self.metrics.batch_size.observe(len(jobs))
                self.metrics.batch_duration.observe(time.monotonic() - started)
            log.debug("batch of %d request(s) ran in %.1f ms", len(jobs), (time.monotonic() - started) * 1000)
