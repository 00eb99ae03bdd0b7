"""Load test of s2s-serve: 16 concurrent vs 16 sequential requests, and requests/s vs concurrency.

    python -m bench.serve_load --model t5-small --threads 2 --out bench-results/serve

Starts the real `s2s-serve` (a subprocess on 127.0.0.1, a free port) over a random-weight model of a
real shape (bench/shapes.py), then sends requests of `--src-len` source tokens asking for exactly
`--new-tokens` new tokens (min = max), so every request does the same work:

1. `--requests` requests one after another, then the same number all at once; the report gives the
   ratio of the two wall times (dynamic batching is what makes the concurrent ones finish sooner).
   The two are interleaved `--rounds` times and the medians compared, since this machine is shared.
2. For each concurrency c of `--concurrency`, c clients in a closed loop send `max(2c, 8)` requests
   in all: requests/s and latency percentiles per c, as a table (stdout, serve_load.md), JSON
   (serve_load.json) and a chart (serve_load.png).

The shapes have no tokenizer; the model is given a word-level one whose words are its token ids
("w17 w923 ..."), so requests are text, as a client sends them, and each token costs what it costs
the real model.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import click
import numpy as np

from runtime.clickutil import S2SCommand
from runtime.errors import InvalidOptionError
from runtime.manifest import MANIFEST_NAME, Manifest

TIMEOUT = 600  # seconds, for one request: generous on a shared machine, but bounded


@click.command(cls=S2SCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "shape", default="t5-small", show_default=True,
              help="A shape of bench/shapes.py (t5-small, bart-base, tiny-t5).")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True,
              help="onnxruntime intra-op threads of the server.")
@click.option("--requests", "count", type=click.IntRange(min=1), default=16, show_default=True,
              help="Requests of the sequential vs concurrent comparison.")
@click.option("--concurrency", default="1,2,4,8,16,32", show_default=True, help="Client counts of the sweep.")
@click.option("--src-len", type=click.IntRange(min=2), default=32, show_default=True)
@click.option("--new-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--max-batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=5.0, show_default=True)
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=Path("bench-results/serve"),
              show_default=True)
@click.option("--cache-dir", type=click.Path(path_type=Path), default=None,
              help="Where shape checkpoints and exports are kept (default: s2s-bench's).")
def main(shape: str, threads: int, count: int, concurrency: str, src_len: int, new_tokens: int, rounds: int,
         max_batch_size: int, max_wait_ms: float, out_dir: Path, cache_dir: Path | None) -> None:
    """Measure s2s-serve's dynamic batching: sequential vs concurrent requests, requests/s vs concurrency."""
    from bench.cli import default_cache_dir
    from bench.measure import cpu_snapshot, others_cpu_share
    from bench.report import machine_info

    levels = _levels(concurrency)
    export_dir = served_export(shape, cache_dir or default_cache_dir())
    manifest = Manifest.read(export_dir)
    prompts = _prompts(manifest, src_len, seed=0, count=max(count, 2 * max(levels), 8))
    parameters = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    command = [str(Path(sys.executable).parent / "s2s-serve"), str(export_dir), "--port", "0", "--provider", "cpu",
               "--threads", str(threads), "--max-batch-size", str(max_batch_size), "--max-wait-ms", str(max_wait_ms),
               "--max-concurrent-requests", str(max(256, 2 * max(levels)))]
    snapshot = cpu_snapshot()
    with _Server(command) as server:
        for prompt in prompts[:2]:  # warm-up: the first runs of a session are slower
            server.generate(prompt, parameters)
        comparison = []
        for _ in range(rounds):
            sequential = _timed(lambda: [server.generate(p, parameters) for p in prompts[:count]])
            concurrent = _timed(lambda: _at_once(server, prompts[:count], parameters))
            comparison.append({"sequential_s": sequential, "concurrent_s": concurrent})
        sweep = [_closed_loop(server, prompts, parameters, clients) for clients in levels]
    # after the server exited and was waited for: its CPU time then counts as ours, not as others'
    results = {
        "machine": machine_info(others_cpu_share(snapshot, cpu_snapshot())),
        "command": "python -m bench.serve_load " + " ".join(sys.argv[1:]),
        "model": shape, "threads": threads, "src_len": src_len, "new_tokens": new_tokens, "requests": count,
        "max_batch_size": max_batch_size, "max_wait_ms": max_wait_ms,
        "comparison": comparison,
        "ratio": statistics.median(r["sequential_s"] for r in comparison) /
                 statistics.median(r["concurrent_s"] for r in comparison),
        "sweep": sweep,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "serve_load.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    report = markdown(results)
    (out_dir / "serve_load.md").write_text(report, encoding="utf-8")
    chart(results, out_dir / "serve_load.png")
    click.echo(report)
    click.echo(f"wrote {out_dir / 'serve_load.json'}, {out_dir / 'serve_load.md'}, {out_dir / 'serve_load.png'}")


def served_export(shape: str, cache_dir: Path) -> Path:
    """The shape's fp32 export (s2s-bench's cached one), copied once with a word-level tokenizer added."""
    from bench.engines.s2s import prepare
    from bench.shapes import SHAPES
    from bench.sources import resolve

    if shape not in SHAPES:
        raise InvalidOptionError(f"--model {shape!r}: expected one of {', '.join(sorted(SHAPES))}")
    export_dir = prepare(resolve(shape, cache_dir), "fp32", "cpu", cache_dir)
    target = cache_dir / "artefacts" / "serve" / f"{shape}-{export_dir.name}"
    if (target / MANIFEST_NAME).is_file():
        return target
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(export_dir, staging)
    manifest = Manifest.read(staging)
    _word_tokenizer(manifest).save(str(staging / "tokenizer.json"))
    replace(manifest, tokenizer_file="tokenizer.json").write(staging)
    staging.rename(target)
    return target


def _word_tokenizer(manifest: Manifest):
    """A word-level tokenizer whose word "w<i>" is token i; EOS appended to each input, like T5's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    specials = {manifest.pad_token_id: "<pad>", manifest.eos_token_ids[0]: "</s>"}
    vocab = {specials.get(i, f"w{i}"): i for i in range(manifest.vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w2"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                             special_tokens=[("</s>", manifest.eos_token_ids[0])])
    tokenizer.add_special_tokens(list(specials.values()))
    return tokenizer


def _prompts(manifest: Manifest, src_len: int, seed: int, count: int) -> list[str]:
    """Seeded random texts of src_len tokens (src_len - 1 words + EOS), of ordinary tokens only."""
    rng = np.random.default_rng(seed)
    low = max(manifest.pad_token_id, *manifest.eos_token_ids, manifest.decoder_start_token_id) + 1
    return [" ".join(f"w{i}" for i in rng.integers(low, manifest.vocab_size, size=src_len - 1)) for _ in range(count)]


def _levels(spec: str) -> list[int]:
    try:
        levels = [int(part) for part in spec.split(",") if part.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise InvalidOptionError(f"--concurrency {spec!r}: expected client counts >= 1 like 1,2,4,8")
    return levels


class _Server:
    """s2s-serve in a subprocess; its stderr is drained by a thread (and kept for error messages)."""

    def __init__(self, command: list[str]):
        self.command = command
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []

    def __enter__(self) -> _Server:
        self.process = subprocess.Popen(self.command, stderr=subprocess.PIPE, text=True,
                                        env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self._drainer = threading.Thread(target=self._drain, daemon=True)
        self._drainer.start()
        self._local = threading.local()
        deadline = time.monotonic() + 300
        self.url = None
        try:
            while self.url is None:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
                if not line:
                    raise RuntimeError("s2s-serve exited:\n" + "".join(self.log))
                found = re.search(r"listening on (http://\S+)", line)
                self.url = found.group(1) if found else None
        except BaseException as err:
            self.__exit__()
            if isinstance(err, queue.Empty):
                raise RuntimeError("s2s-serve did not start within 300 s:\n" + "".join(self.log)) from None
            raise
        return self

    def _drain(self) -> None:
        for line in self.process.stderr:
            self.log.append(line)
            self.lines.put(line)
        self.lines.put("")

    def generate(self, prompt: str, parameters: dict[str, Any]) -> float:
        """One request (a keep-alive session per client thread); returns its latency in seconds."""
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = self._local.session = requests.Session()
        started = time.perf_counter()
        response = session.post(self.url + "/generate", json={"inputs": prompt, "parameters": parameters},
                                timeout=TIMEOUT)
        if response.status_code != 200:
            raise RuntimeError(f"s2s-serve answered {response.status_code}: {response.text}")
        return time.perf_counter() - started

    def __exit__(self, *exc: Any) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self._drainer.join(timeout=10)  # EOF once the process is gone
        self.process.stderr.close()


def _timed(work) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def _at_once(server: _Server, prompts: list[str], parameters: dict[str, Any]) -> list[float]:
    start = threading.Barrier(len(prompts))

    def one(prompt: str) -> float:
        start.wait(timeout=60)
        return server.generate(prompt, parameters)

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def _closed_loop(server: _Server, prompts: list[str], parameters: dict[str, Any], clients: int) -> dict[str, Any]:
    """`clients` threads sending back to back, max(2 * clients, 8) requests in all."""
    total = max(2 * clients, 8)
    todo: queue.Queue[str] = queue.Queue()
    for i in range(total):
        todo.put(prompts[i % len(prompts)])
    latencies: list[float] = []
    lock = threading.Lock()

    def client() -> None:
        while True:
            try:
                prompt = todo.get_nowait()
            except queue.Empty:
                return
            latency = server.generate(prompt, parameters)
            with lock:
                latencies.append(latency)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    elapsed = time.perf_counter() - started
    return {"concurrency": clients, "requests": total, "seconds": elapsed, "requests_per_s": total / elapsed,
            "latency_p50_s": float(np.percentile(latencies, 50)), "latency_p90_s": float(np.percentile(latencies, 90))}


def markdown(results: dict[str, Any]) -> str:
    machine = results["machine"]
    rounds = results["comparison"]
    sequential = ", ".join(f"{r['sequential_s']:.2f}" for r in rounds)
    concurrent = ", ".join(f"{r['concurrent_s']:.2f}" for r in rounds)
    lines = [
        f"model: {results['model']} shape, random weights, fp32, CPU, server threads {results['threads']}; "
        f"{results['src_len']} source tokens, {results['new_tokens']} new tokens per request (min = max); "
        f"--max-batch-size {results['max_batch_size']}, --max-wait-ms {results['max_wait_ms']:g}  ",
        f"machine: {machine['cpu']}, {machine['usable_cores']} usable cores; other processes used "
        f"{machine['others_cpu_pct']}% of its CPU meanwhile  ",
        f"run: `{results['command']}`",
        "",
        f"{results['requests']} requests: sequential {sequential} s, concurrent {concurrent} s (per round): "
        f"concurrent finish **{results['ratio']:.1f}x** sooner (ratio of medians)",
        "",
        "| concurrency | requests | seconds | requests/s | p50 latency s | p90 latency s |",
        "|---|---|---|---|---|---|",
    ]
    for row in results["sweep"]:
        lines.append(f"| {row['concurrency']} | {row['requests']} | {row['seconds']:.2f} | {row['requests_per_s']:.2f} "
                     f"| {row['latency_p50_s']:.2f} | {row['latency_p90_s']:.2f} |")
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = results["sweep"]
    levels = [row["concurrency"] for row in sweep]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(levels, [row["requests_per_s"] for row in sweep], marker="o", label="s2s-serve")
    if levels[0] == 1:  # what no batching would give at any concurrency
        axis.axhline(sweep[0]["requests_per_s"], color="grey", linestyle="--", label="one client")
    axis.set_xscale("log", base=2)
    axis.set_xticks(levels, [str(c) for c in levels])
    axis.set_xlabel("concurrent clients")
    axis.set_ylabel("requests / s")
    axis.set_title(f"s2s-serve, {results['model']} shape, {results['new_tokens']} new tokens, "
                   f"{results['threads']} threads")
    axis.grid(True, alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


if __name__ == "__main__":
    main()
