"""Which batching inside a Ray Serve replica: the project's Batcher, or Ray Serve's `@serve.batch`?

    python -m bench.ray_serve_batching              # t5-small shape, fp32, 1 replica x 2 threads, 32 requests

Two deployments of one replica each over the same export, deployed side by side on a local Ray and
called in turns through their DeploymentHandles (no HTTP, so only the batching differs):

- `batcher`: serve.ray_deployment.S2SGenerator, the deployment `s2s-serve --ray` runs: serve.batcher.Batcher
  in a worker thread (batches by batch key, oldest request first, a padded-token budget);
- `serve.batch`: `@serve.batch(max_batch_size, batch_wait_timeout_s)` over the same `serve.generation.run_batch`,
  in a thread so that the replica keeps taking requests; a batch holding several batch keys runs one
  key's requests after another (`run_batch` needs one key per call).

Same limits for both (--max-batch-size, --max-wait-ms). Workloads: `greedy` (every request greedy,
--new-tokens new tokens, min = max) and `mixed` (every other request beam search with 4 beams). For
each, --requests requests from --clients closed-loop clients; requests/s and latency percentiles,
the order of the two deployments rotating each round, medians over --rounds.
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

from bench.text_inputs import prepared_text_export
from runtime.clickutil import S2SCommand

WORKLOADS = ("greedy", "mixed")


def _serve_batch_deployment():
    """The @serve.batch variant (defined when Ray is imported; the bench imports Ray only in main)."""
    from ray import serve

    import runtime
    from serve.detokenize import TokenTexts
    from serve.generation import Job, batch_key, run_batch

    @serve.deployment
    class ServeBatchGenerator:
        def __init__(self, export_dir: str, threads: int, max_batch_size: int, max_wait_ms: float):
            self.model = runtime.load(export_dir, provider="cpu", threads=threads)
            self.texts = TokenTexts(self.model)
            self.generate_batch.set_max_batch_size(max_batch_size)
            self.generate_batch.set_batch_wait_timeout_s(max_wait_ms / 1000)

        async def generate(self, request):
            return await self.generate_batch(request)

        @serve.batch
        async def generate_batch(self, requests: list) -> list:
            return await asyncio.to_thread(self._run, requests)

        def _run(self, requests: list) -> list:
            results: list[Any] = [None] * len(requests)
            by_key: dict[Any, list[int]] = {}
            for index, request in enumerate(requests):
                by_key.setdefault(batch_key(request), []).append(index)
            for indices in by_key.values():  # one generate call per key, one after another
                run_batch(self.model, self.texts,
                          [Job(requests[i], lambda event, i=i: results.__setitem__(i, event)) for i in indices])
            return results

    return ServeBatchGenerator


def _closed_loop(handle, requests: list, clients: int) -> tuple[float, list[float]]:
    """Send every request, `clients` at a time; (wall seconds, per-request latencies)."""
    pending = list(range(len(requests)))
    lock = threading.Lock()
    latencies: list[float] = []

    def client() -> None:
        while True:
            with lock:
                if not pending:
                    return
                index = pending.pop(0)
            started = time.perf_counter()
            result = handle.generate.remote(requests[index]).result(timeout_s=600)
            assert not isinstance(result, Exception), result
            with lock:
                latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, latencies


@click.command(cls=S2SCommand)
@click.option("--model", default="t5-small", show_default=True, help="A bench shape (bench/shapes.py) or checkpoint.")
@click.option("--precision", type=click.Choice(["fp32", "int8"]), default="fp32", show_default=True)
@click.option("--requests", "request_count", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--clients", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--src-words", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="Per replica.")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=5.0, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path.home() / ".cache" / "s2s-bench", show_default=True)
def main(model: str, precision: str, request_count: int, clients: int, src_words: int, new_tokens: int, threads: int,
         max_batch_size: int, max_wait_ms: float, rounds: int, cache_dir: Path) -> None:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    import runtime
    from serve.batcher import BatchLimits
    from serve.ray_deployment import S2SGenerator
    from serve.schema import RequestValidator

    export = str(prepared_text_export(model, precision, cache_dir))
    loaded = runtime.load(export, provider="cpu", threads=1)
    validator = RequestValidator(loaded, max_input_tokens=1024)
    rng = np.random.default_rng(0)
    prompts = [" ".join(f"w{i}" for i in rng.integers(3, loaded.manifest.vocab_size, src_words))
               for _ in range(request_count)]
    greedy = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    workloads = {
        "greedy": [validator.validate({"inputs": p, "parameters": greedy}, stream=False) for p in prompts],
        "mixed": [validator.validate({"inputs": p, "parameters": {**greedy, **({"num_beams": 4} if i % 2 else {})}},
                                     stream=False) for i, p in enumerate(prompts)],
    }

    ray.init(num_cpus=2 * threads, include_dashboard=False, logging_level="WARNING")
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    serve.start(proxy_location="Disabled")  # handles only: no HTTP proxy, no port taken
    resources = {"num_cpus": threads}
    limits = BatchLimits(max_batch_size=max_batch_size, max_wait_ms=max_wait_ms)
    handles = {
        "batcher": serve.run(S2SGenerator.options(max_ongoing_requests=4 * request_count, ray_actor_options=resources)
                             .bind(export, provider="cpu", threads=threads, limits=limits),
                             name="batcher", route_prefix=None),
        "serve.batch": serve.run(_serve_batch_deployment().options(max_ongoing_requests=4 * request_count,
                                                                   ray_actor_options=resources)
                                 .bind(export, threads, max_batch_size, max_wait_ms),
                                 name="serve-batch", route_prefix=None),
    }
    variants = list(handles)
    for handle in handles.values():  # warm-up: sessions, arena
        _closed_loop(handle, workloads["mixed"][:4], 4)
    rates: dict[tuple[str, str], list[float]] = {(w, v): [] for w in WORKLOADS for v in variants}
    latency: dict[tuple[str, str], list[float]] = {(w, v): [] for w in WORKLOADS for v in variants}
    for round_number in range(rounds):
        for workload in WORKLOADS:
            order = variants[round_number % 2:] + variants[:round_number % 2]
            for variant in order:
                wall, latencies = _closed_loop(handles[variant], workloads[workload], clients)
                rates[(workload, variant)].append(request_count / wall)
                latency[(workload, variant)].extend(latencies)
                click.echo(f"round {round_number + 1}: {workload}, {variant}: {request_count / wall:.2f} requests/s",
                           err=True)
    serve.shutdown()
    ray.shutdown()
    click.echo(f"\n{model} {precision}, 1 replica x {threads} threads, {request_count} requests of {src_words + 1} "
               f"tokens, {new_tokens} new tokens (min = max), {clients} clients, max batch {max_batch_size}, "
               f"wait {max_wait_ms:g} ms; median of {rounds} rounds\n")
    click.echo("| workload | batching | requests/s | p50 latency s | p90 latency s |")
    click.echo("|---|---|---|---|---|")
    for workload in WORKLOADS:
        for variant in variants:
            lat = latency[(workload, variant)]
            click.echo(f"| {workload} | {variant} | {statistics.median(rates[(workload, variant)]):.2f} | "
                       f"{np.percentile(lat, 50):.2f} | {np.percentile(lat, 90):.2f} |")


if __name__ == "__main__":
    main()
