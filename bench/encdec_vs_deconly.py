"""Encoder-decoder vs decoder-only at equal parameter count on the demo task: exact match and latency.

    python -m bench.encdec_vs_deconly --decoder-only out/lm [--encoder-decoder models/demo] [--threads 2]

Both are models/ checkpoints trained by s2s-train on the built-in instruction mix with the same recipe
(1000 steps of 64, AdamW, warm-up and cosine decay): the bundled demo (`s2s-train -o models/demo
--threads 1`, an EfficientInstructionLLM, 1.01M parameters) and its decoder-only peer
(`s2s-train -o out/lm --model SimpleDecoderOnly --d-model 120 --heads 4 --layers 4 --threads 1`, 1.01M).
Each is exported with s2s-export (validated against PyTorch) and run on the s2s runtime, CPU:
- exact match on the held-out instructions (never seen in training), greedy and beam search;
- latency of one instruction (batch 1, greedy), median and p90, the two models interleaved call by
  call in alternating order, so that a neighbour's load falls on both alike;
- a batch of instructions (greedy): ms per call, interleaved the same way, over `rounds` rounds.
Both answer with their generation defaults (at most 16 new tokens, stopping at EOS). The decoder-only
model's prompt is the instruction the encoder reads (its tokens and EOS), left-padded in a batch.
Both run without IO binding, the one path the decoder-only runtime has (runtime/decoder_only.py), so
that the loops around the graphs are alike: with its default IO binding the encoder-decoder is faster
still.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np

import runtime
from demo import DEMO_DIR
from exporter import export
from models.checkpoint import load_checkpoint
from models.evaluate import exact_match
from models.tasks import held_out_examples
from runtime.clickutil import S2SCommand

WARMUP_CALLS = 3


@dataclass(frozen=True)
class Row:
    name: str  # "encoder-decoder" or "decoder-only"
    class_name: str
    parameters: int
    exact_match_greedy: float
    exact_match_beam: float
    batch1_median_ms: float
    batch1_p90_ms: float
    batch_median_ms: float  # one call of `batch_size` instructions
    prompt_tokens: float  # mean tokens the model reads per instruction (encoder input or prompt)


def compare(checkpoints: dict[str, Path], work_dir: Path, *, threads: int = 2, held_out_per_task: int = 100,
            num_beams: int = 4, latency_calls: int = 100, batch_size: int = 32, rounds: int = 5) -> list[Row]:
    """Export each checkpoint into work_dir and measure it (see the module docstring); rows in the
    order of `checkpoints` (name -> checkpoint directory)."""
    held_out = held_out_examples(held_out_per_task)
    sources, targets = [s for s, _ in held_out], [t for _, t in held_out]
    models, parameters, classes = {}, {}, {}
    for name, checkpoint in checkpoints.items():
        loaded = load_checkpoint(checkpoint)
        parameters[name] = sum(p.numel() for p in loaded.model.parameters())
        classes[name] = loaded.config.class_name
        models[name] = runtime.load(export(checkpoint, work_dir / name, force=True).output, provider="cpu",
                                    threads=threads, io_binding=False)
    accuracy = {name: (exact_match(model.generate_text(sources), targets),
                       exact_match(model.generate_text(sources, num_beams=num_beams), targets))
                for name, model in models.items()}
    # spread over the tasks: every len(sources) / latency_calls-th instruction
    singles = [[s] for s in sources[:: max(1, len(sources) // latency_calls)][:latency_calls]]
    batch1 = _interleaved(models, singles, WARMUP_CALLS)
    batches = _interleaved(models, [sources[:batch_size]] * rounds, 1)
    rows = []
    for name, model in models.items():
        prompt_tokens = np.mean([len(ids) for ids in model.text.token_ids(sources)[0]])
        rows.append(Row(name, classes[name], parameters[name], *accuracy[name], float(np.median(batch1[name])),
                        float(np.percentile(batch1[name], 90)), float(np.median(batches[name])), float(prompt_tokens)))
    return rows


def _interleaved(models: dict, calls: list[list[str]], warmup: int) -> dict[str, list[float]]:
    """ms of generate_text(call) per model, for every call: the models take turns, call by call, the first
    of each turn alternating. `warmup` calls of each model first, not timed."""
    for model in models.values():
        for _ in range(warmup):
            model.generate_text(calls[0])
    times: dict[str, list[float]] = {name: [] for name in models}
    names = list(models)
    for index, call in enumerate(calls):
        for name in names if index % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            models[name].generate_text(call)
            times[name].append((time.perf_counter() - start) * 1000)
    return times


def table(rows: list[Row], num_beams: int, batch_size: int) -> str:
    """The comparison as a markdown table."""
    lines = [f"| model | class | parameters | exact match greedy | exact match beam {num_beams} | "
             f"batch 1 median ms | batch 1 p90 ms | batch {batch_size} ms | tokens read |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.name} | {r.class_name} | {r.parameters / 1e6:.2f}M | {r.exact_match_greedy:.1%} | "
                     f"{r.exact_match_beam:.1%} | {r.batch1_median_ms:.1f} | {r.batch1_p90_ms:.1f} | "
                     f"{r.batch_median_ms:.0f} | {r.prompt_tokens:.1f} |")
    return "\n".join(lines)


@click.command(cls=S2SCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--decoder-only", "decoder_only", type=click.Path(exists=True, file_okay=False, path_type=Path),
              required=True, help="The decoder-only checkpoint (s2s-train --model SimpleDecoderOnly ...).")
@click.option("--encoder-decoder", "encoder_decoder", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=DEMO_DIR, show_default=True, help="The encoder-decoder checkpoint.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True, help="onnxruntime threads.")
@click.option("--num-beams", type=click.IntRange(min=2), default=4, show_default=True)
@click.option("--held-out-per-task", type=click.IntRange(min=1), default=100, show_default=True,
              help="Held-out instructions per task for exact match (100: the 400 s2s-train reports on).")
@click.option("--latency-calls", type=click.IntRange(min=1), default=100, show_default=True,
              help="Batch-1 calls timed per model.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True, help="Timed batch calls per model.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the rows, settings and machine load as JSON here.")
def main(decoder_only: Path, encoder_decoder: Path, threads: int, num_beams: int, held_out_per_task: int,
         latency_calls: int, batch_size: int, rounds: int, out: Path | None) -> None:
    """Export both checkpoints, then print exact match and latency side by side (markdown)."""
    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="s2s-encdec-vs-deconly-") as work_dir:
        rows = compare({"encoder-decoder": encoder_decoder, "decoder-only": decoder_only}, Path(work_dir),
                       threads=threads, held_out_per_task=held_out_per_task, num_beams=num_beams,
                       latency_calls=latency_calls, batch_size=batch_size, rounds=rounds)
    load_after = os.getloadavg()
    click.echo(table(rows, num_beams, batch_size))
    click.echo(f"\n{threads} onnxruntime threads, CPU; load average {load_before[0]:.1f} before, "
               f"{load_after[0]:.1f} after ({os.cpu_count()} cores); {time.perf_counter() - started:.0f}s in all")
    if out is not None:
        settings = dict(threads=threads, num_beams=num_beams, held_out_per_task=held_out_per_task,
                        latency_calls=latency_calls, batch_size=batch_size,
                        rounds=rounds, encoder_decoder=str(encoder_decoder), decoder_only=str(decoder_only))
        out.write_text(json.dumps({"rows": [asdict(r) for r in rows], "settings": settings,
                                   "load_average": [load_before, load_after]}, indent=2) + "\n")


if __name__ == "__main__":
    main()
