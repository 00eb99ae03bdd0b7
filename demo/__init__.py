"""`make demo` (`python -m demo`): export the bundled model and run it, against eager PyTorch.

It sits above exporter/, models/ and runtime/: it uses all three, and none of them imports it.

1. exports models/demo/ (an EfficientInstructionLLM trained by `s2s-train` on the instruction mix)
   with s2s-export's API, validation included;
2. answers a few instructions with the s2s runtime (`runtime.load(...).generate_text`);
3. measures exact match on the held-out instructions (never seen in training) four ways: eager
   PyTorch and the ONNX runtime, each greedy and with beam search; the runtime must give the same
   answers as PyTorch, so the accuracies must be equal (exit status 1 otherwise).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import torch
from tokenizers import Tokenizer

import models
import runtime
from exporter import export
from models.checkpoint import load_checkpoint
from models.evaluate import exact_match, predict
from models.tasks import held_out_examples
from runtime.clickutil import S2SCommand

DEMO_DIR = Path(models.__file__).parent / "demo"  # the checkpoint, package data of models/
HELD_OUT_PER_TASK = 100  # what `s2s-train` held out when it trained the bundled model
EXAMPLES = ("reverse: river apple stone candle", "sort: q d x a m", "spell out: 4721", "spell out: 90",
            "date: 7 March 2021", "date: December 25, 1999", "date: 02/29/2024")
NUM_BEAMS = 4


@click.command(cls=S2SCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the export in this directory (new or empty). Default: a temporary directory, removed after.")
@click.option("--threads", type=click.IntRange(min=1), default=2, show_default=True,
              help="CPU threads for PyTorch and for onnxruntime alike.")
def main(output: Path | None, threads: int) -> None:
    """Export the bundled instruction model, run it with the s2s runtime, and compare with PyTorch."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    if output is not None:
        _run(output, threads, started)
        return
    with tempfile.TemporaryDirectory(prefix="s2s-demo-") as tmp:
        _run(Path(tmp) / "demo-export", threads, started)


def _run(output: Path, threads: int, started: float) -> None:
    checkpoint = load_checkpoint(DEMO_DIR)
    parameters = sum(p.numel() for p in checkpoint.model.parameters())
    click.echo(f"bundled model: {checkpoint.config.class_name}, {parameters / 1e6:.2f}M parameters ({DEMO_DIR})")

    click.echo(f"exporting with s2s-export -> {output}")
    report = export(DEMO_DIR, output)
    worst = max(c.max_abs_diff for c in report.validation.comparisons)
    click.echo(f"  {', '.join(f'{step} {seconds:.1f}s' for step, seconds in report.timings)}")
    click.echo(f"  validated: logits within {worst:.1e} of PyTorch, greedy tokens identical")

    model = runtime.load(output, provider="cpu", threads=threads)
    click.echo("\nthe ONNX runtime answers (greedy):")
    for instruction, answer in zip(EXAMPLES, model.generate_text(list(EXAMPLES))):
        click.echo(f"  {instruction:<40} -> {answer}")

    held_out = held_out_examples(HELD_OUT_PER_TASK)
    sources, targets = [s for s, _ in held_out], [t for _, t in held_out]
    tokenizer = Tokenizer.from_file(str(checkpoint.tokenizer_file))
    max_new_tokens = checkpoint.config.generation["max_new_tokens"]
    click.echo(f"\nheld-out exact match ({len(held_out)} instructions never seen in training):")
    click.echo(f"  {'':<16}{'greedy':>10}{f'beam {NUM_BEAMS}':>10}{'seconds':>10}")
    answers, seconds = {}, {}
    for engine in ("eager PyTorch", "ONNX runtime"):
        tick = time.perf_counter()
        for beams in (1, NUM_BEAMS):
            if engine == "eager PyTorch":
                answers[engine, beams] = predict(checkpoint.model, tokenizer, checkpoint.config.special_tokens,
                                                 sources, max_new_tokens=max_new_tokens, num_beams=beams)
            else:
                answers[engine, beams] = model.generate_text(sources, num_beams=beams)
        seconds[engine] = time.perf_counter() - tick
        scores = [exact_match(answers[engine, beams], targets) for beams in (1, NUM_BEAMS)]
        click.echo(f"  {engine:<16}{scores[0]:>10.1%}{scores[1]:>10.1%}{seconds[engine]:>10.1f}")

    same = all(answers["eager PyTorch", b] == answers["ONNX runtime", b] for b in (1, NUM_BEAMS))
    click.echo(f"  identical answers, PyTorch vs ONNX runtime: {'yes' if same else 'NO'}")
    click.echo(f"\ntotal time: {time.perf_counter() - started:.1f}s ({threads} threads)")
    if not same:
        raise SystemExit(1)

