"""s2s-export: a seq2seq checkpoint to a validated ONNX export directory for the s2s runtime.

Progress (each step and how long it took) goes to stderr, the summary to stdout. Errors a user can fix
are one line ("Error: ...") and exit status 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from exporter.api import DTYPES, MAX_OPSET, MIN_OPSET, QUANTIZE, ExportReport, export
from exporter.validate import TOLERANCES
from runtime.clickutil import S2SCommand

EPILOG = """\b
Examples:
  s2s-export ./t5-small -o out/t5-small
  s2s-export ./opus-mt-en-de -o out/en-de-int8 --quantize int8
  s2s-export ./t5-small -o out/t5-int4 --quantize int4
  s2s-export ./flan-t5-base -o out/flan-fp16 --dtype fp16 --optimize
  s2s-export ./bart-large-cnn -o out/bart --force --atol 1e-3
  s2s-export google-t5/t5-small -o out/t5   (a hub id: needs the model hub to be reachable)

\b
Then run it:  s2s-run out/t5-small "translate English to German: Hello"
"""


class _StepPrinter:
    """Prints "step ... 1.2 s" lines to stderr; on a terminal the step shows while it runs."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.line_open = False

    def __call__(self, step: str, seconds: float | None) -> None:
        if seconds is None:
            if self.tty:
                click.echo(f"{step} ...", err=True, nl=False)
                self.line_open = True
            return
        if self.line_open:
            click.echo(f" {seconds:.1f} s", err=True)
        else:
            click.echo(f"{step} ... {seconds:.1f} s", err=True)
        self.line_open = False

    def close(self) -> None:
        """End a step line left open by a failure, so the error starts on its own line."""
        if self.line_open:
            click.echo(err=True)
            self.line_open = False


@click.command(cls=S2SCommand, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Directory to write the export to. It must not exist or must be empty (see --force). Nothing "
                   "appears there until the export is complete and validated.")
@click.option("--dtype", type=click.Choice(DTYPES), default="fp32", show_default=True,
              help="Precision of weights and activations. fp16 halves the size and is meant for GPUs (CUDA); "
                   "whatever would overflow in fp16 (e.g. T5's feed-forward output) is kept in fp32.")
@click.option("--quantize", type=click.Choice(QUANTIZE), default=None,
              help="For fast CPU inference: int8 stores weights as int8 and quantizes activations on the fly; int4 "
                   "stores 4-bit weights (smaller still) and computes in int8 where the CPU can. The scheme "
                   "follows this machine's CPU features and s2s.json records it. Generated text can differ "
                   "slightly from the original model's.")
@click.option("--optimize", is_flag=True,
              help="Fuse operations (layer norms, bias+GELU) with onnxruntime's transformer optimizer: a few "
                   "percent faster per decoding step.")
@click.option("--kv-buffer/--no-kv-buffer", default=None,
              help="Keep the decoder's self-attention cache in preallocated buffers written in place (one "
                   "onnxruntime GroupQueryAttention node per layer), so a step costs the same at any length. "
                   "Default: on for fp32/int8/int4 (CPU) exports where the decoder's attention matches, off for "
                   "fp16; --kv-buffer fails where it does not match. Use --no-kv-buffer for an fp32 export meant "
                   "for CUDA, whose GroupQueryAttention takes fp16 only.")
@click.option("--greedy-head/--no-greedy-head", default=None,
              help="Let the decoder choose greedy search's next token itself, so a greedy step's logits never "
                   "leave the graph; for fp32, from an int8 screen of the output projection plus the exact "
                   "logits of the best candidates (same tokens, a quarter of the projection's memory reads). "
                   "Default: on where the self-attention cache is in buffers (--kv-buffer) and the output "
                   "projection matches; --greedy-head fails where it does not.")
@click.option("--packed-qkv/--no-packed-qkv", default=None,
              help="Compute each self-attention layer's query, key and value with one matrix product instead of "
                   "three (the same numbers, fewer kernel calls a step). Default: on where the cache is in "
                   "buffers (--kv-buffer) and a layer matches; --packed-qkv fails where none does.")
@click.option("--no-validate", is_flag=True,
              help="Skip the comparison with PyTorch (logits and greedy tokens). Faster, but a broken export "
                   "would go unnoticed.")
@click.option("--atol", type=float, default=None,
              help="Largest allowed absolute difference between the exported and the PyTorch outputs (encoder "
                   "output, logits). Without it the tolerance follows the precision: fp32 "
                   f"{TOLERANCES['fp32'].describe()}; with --optimize {TOLERANCES['optimize'].describe()}; fp16 "
                   f"{TOLERANCES['fp16'].describe()}; int8 {TOLERANCES['int8'].describe()}; int4 "
                   f"{TOLERANCES['int4'].describe()}.")
@click.option("--force", is_flag=True, help="Replace the output directory if it exists and is not empty.")
@click.option("--opset", type=int, default=None,
              help=f"ONNX opset version of the graphs ({MIN_OPSET} to {MAX_OPSET}). Default: the exporter's choice "
                   "for the architecture.")
def main(model: str, output: Path, dtype: str, quantize: str | None, optimize: bool, kv_buffer: bool | None,
         greedy_head: bool | None, packed_qkv: bool | None, no_validate: bool, atol: float | None, force: bool,
         opset: int | None) -> None:
    """Export MODEL to ONNX for the s2s runtime, and check the result against PyTorch.

    MODEL is a directory written by transformers' save_pretrained (T5, mT5, FLAN-T5, BART, Marian,
    Pegasus, and every other encoder-decoder LM optimum's exporter supports), a models/ checkpoint,
    or a model id on the Hugging Face hub when the hub is reachable.

    The output directory holds the encoder graph, one decoder graph with a cache, the config and
    tokenizer files, and s2s.json, which tells the runtime how to run them.
    """
    printer = _StepPrinter()
    try:
        report = export(model, output, dtype=dtype, quantize=quantize, optimize=optimize, validate=not no_validate,
                        atol=atol, force=force, opset=opset, kv_buffer=kv_buffer, greedy_head=greedy_head,
                        packed_qkv=packed_qkv, progress=printer)
    finally:
        printer.close()
    _print_summary(report)


def _print_summary(report: ExportReport) -> None:
    m = report.manifest
    graphs = ", ".join(m.graph_files)
    passes = f", passes: {', '.join(m.passes)}" if m.passes else ""
    click.echo(f"Exported {m.model_type} to {report.output} ({graphs}; {m.precision}{passes})")
    validation = report.validation
    if validation is None:
        click.echo("Not validated (--no-validate).")
    else:
        click.echo(f"Validated (logits tolerance: {validation.tolerance.describe()}):")
        for c in validation.comparisons:
            click.echo(f"  {c.what:<28} max |diff| {c.max_abs_diff:.2e}  (allowed {c.allowed:.2e})")
        if validation.reference_tokens.shape[1]:  # a regressor has no tokens
            tokens = "identical" if validation.tokens_match else validation.token_agreement()
            click.echo(f"  {'greedy tokens vs PyTorch':<28} {tokens}")
        if validation.graph_tokens is not None:
            click.echo(f"  {'vs transformers on graphs':<28} identical")
    for note in report.notes:
        click.echo(f"Note: {note}")
    total = sum(seconds for _, seconds in report.timings)
    click.echo(f"Done in {total:.1f} s.")
