"""Check an export against its PyTorch model before it is moved into place.

1. Logits: the graphs (run position by position through the cache by `GraphRunner`, following only the
   manifest) and PyTorch (teacher-forced, no cache) on the same padded batch. Three comparisons: the
   encoder output, the first decoder step, and the cached steps after it. Any difference above the
   tolerance, or any non-finite value, fails the export.
2. Tokens: greedy generation, with the model's generation defaults, by the s2s runtime loading the
   directory (so the manifest is checked the way users will run it) and by PyTorch's `generate`.
   For fp32 exports (with or without --optimize) the tokens must be identical. For fp16 and int8
   they are compared and reported, not required: a reduced-precision model may legitimately pick
   another token where two candidates are close (random tiny models are full of such near-ties).
   What is required at every precision, for exports in optimum's layout, is that the runtime decodes
   the graphs exactly as transformers' `generate` does over the same graphs (optimum's
   ORTModelForSeq2SeqLM, an independent decoding loop with transformers' own logits processors).
   The default HF layout (encoder.onnx + decoder.onnx, cross-attention K/V from the encoder) is not
   one ORTModelForSeq2SeqLM can load, so that check is skipped there; the logits comparison (run by
   GraphRunner, which shares no code with the runtime's loop) and the tokens against PyTorch remain.

Validation runs on the CPU provider. For fp16 graphs that provider computes most ops in float32 (it
casts around ops without a float16 kernel and drops the casts between them), so the check measures
the rounding of the weights and of the tensors kept in float16, but cannot reveal every overflow a
CUDA kernel would hit: the fp16 pass's range analysis is what keeps those in float32
(tests/test_export_passes.py checks that in true float16 arithmetic, with onnx's reference evaluator).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exporter.errors import ValidationError
from exporter.graph_runner import GraphRunner
from exporter.sources import TorchReference
from runtime.manifest import ENCODER_DECODER, LAST_HIDDEN_STATE, Manifest
from runtime.optimum_layout import ENCODER_FILE, MERGED_DECODER_FILE, WITH_PAST_FILE

GREEDY_TOKENS = 8  # new tokens generated both ways


@dataclass(frozen=True)
class Tolerance:
    """Allowed max |export - PyTorch|: atol, plus `rel` times the largest |PyTorch value| compared.

    The relative part is for reduced precision, whose error scales with the values (a fixed atol would
    be too loose for a tiny model and too tight for a real one).
    """

    atol: float
    rel: float = 0.0

    def allowed(self, scale: float) -> float:
        return self.atol + self.rel * scale

    def describe(self) -> str:
        parts = [f"{self.atol:g} absolute"] if self.atol else []
        if self.rel:
            parts.append(f"{self.rel * 100:g}% of the largest |PyTorch value|")
        return " + ".join(parts) or "0"


# Default tolerance by what the passes did (see `default_tolerance`). Measured on the test fixtures,
# whose large random init gives logits up to ~80 (max |diff| / largest |PyTorch value|):
# - fp32: rounding, which grows with the activations: ~2e-5 (hence 1e-4 absolute plus 0.01%);
# - --optimize: fused kernels round differently: up to ~6e-5 (marian), hence 0.1%;
# - fp16: 1-5% on the fixtures (PyTorch's own fp16 is 3-6% off its fp32 there), ~0.05% on
#   well-conditioned tiny models;
# - int8 (dynamic, per-tensor): 1-3% on well-conditioned tiny models (DESIGN.md: ~1.5% on a t5-small
#   shape), but 40-65% on the large-init fixtures, which int8 does not survive: such a model fails
#   validation and says so, rather than being exported as if it worked;
# - int4 (MatMulNBits, 4-bit blocks): 16 levels per block of weights, so errors several times int8's:
#   7-8% on the trained demo model (models/demo), 12-16% on the random t5-small shape, 16-18% on the
#   well-conditioned tiny t5 (tests/test_export_passes.py); 25% still fails a broken graph (errors of
#   the order of the values themselves) and non-finite values.
TOLERANCES = {
    "fp32": Tolerance(atol=1e-4, rel=1e-4),
    "optimize": Tolerance(atol=1e-4, rel=1e-3),
    "fp16": Tolerance(atol=0.0, rel=0.10),
    "int8": Tolerance(atol=0.0, rel=0.10),
    "int4": Tolerance(atol=0.0, rel=0.25),
}


def default_tolerance(precision: str, optimized: bool) -> Tolerance:
    if precision != "fp32":
        return TOLERANCES[precision]
    return TOLERANCES["optimize"] if optimized else TOLERANCES["fp32"]


@dataclass(frozen=True)
class Comparison:
    what: str  # "encoder output", "first decoder step logits", "cached decoder step logits"
    max_abs_diff: float  # inf when the export produced a non-finite value
    largest_reference: float  # largest |PyTorch value|, the scale of a relative tolerance
    allowed: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.allowed


@dataclass(frozen=True)
class ValidationReport:
    tolerance: Tolerance
    comparisons: tuple[Comparison, ...]
    reference_tokens: np.ndarray  # [batch, len] int64 from PyTorch's generate
    export_tokens: np.ndarray  # [batch, len] int64 from the runtime on the export
    graph_tokens: np.ndarray | None  # [batch, len] int64 from transformers' generate over the graphs (optimum layout)
    tokens_required: bool  # False for fp16/int8: a mismatch with PyTorch is reported, not an error

    @property
    def tokens_match(self) -> bool:
        """The runtime's tokens on the export equal PyTorch's."""
        return _same(self.reference_tokens, self.export_tokens)

    def token_agreement(self) -> str:
        """"k of n generated tokens agree" over the positions both produced."""
        length = min(self.reference_tokens.shape[1], self.export_tokens.shape[1])
        same = self.reference_tokens[:, 1:length] == self.export_tokens[:, 1:length]
        return f"{int(same.sum())} of {same.size} generated tokens agree"


def validate_export(export_dir: Path, manifest: Manifest, reference: TorchReference,
                    inputs: tuple[np.ndarray, np.ndarray], tolerance: Tolerance,
                    tokens_required: bool) -> ValidationReport:
    """Compare the export in export_dir with `reference` on `inputs` ([batch, src_len] int64 ids, mask).

    Raises:
        ValidationError: logits differ beyond the tolerance (or are not finite), or, when
            tokens_required, the greedy tokens differ.
    """
    import runtime

    if manifest.kind != ENCODER_DECODER:  # models/ decoder-only models and regressors
        from exporter.validate_kinds import validate_other_kind

        return validate_other_kind(export_dir, manifest, reference, inputs, tolerance, tokens_required)
    assert manifest.pad_token_id is not None  # Manifest.check: an encoder-decoder has one
    input_ids, attention_mask = inputs
    reference_tokens = reference.generate(input_ids, attention_mask, GREEDY_TOKENS)
    comparisons = _compare_logits(export_dir, manifest, reference, inputs,
                                  _teacher_forced_ids(reference_tokens, manifest.pad_token_id), tolerance)
    for comparison in comparisons:
        if not comparison.ok:
            raise ValidationError(_logits_message(comparison, tolerance, manifest.precision))

    model = runtime.Model(export_dir, provider="cpu")
    export_tokens = model.generate(input_ids, attention_mask, max_new_tokens=GREEDY_TOKENS, num_beams=1,
                                   do_sample=False)
    graph_tokens = _transformers_over_graphs(export_dir, manifest, input_ids, attention_mask)
    if graph_tokens is not None and not _same(graph_tokens, export_tokens):
        raise ValidationError(
            f"the s2s runtime decodes the exported graphs differently from transformers' generate over the same "
            f"graphs: transformers {graph_tokens.tolist()}, s2s runtime {export_tokens.tolist()}; this is a bug in "
            "s2s (please report it); pass --no-validate to keep the export anyway"
        )
    return checked_report(ValidationReport(tolerance, comparisons, reference_tokens, export_tokens, graph_tokens,
                                           tokens_required))


def checked_report(report: ValidationReport) -> ValidationReport:
    """The report, or ValidationError where greedy tokens had to match the reference's and did not."""
    if report.tokens_required and not report.tokens_match:
        raise ValidationError(
            f"greedy tokens differ although the logits agree within {report.tolerance.describe()}: PyTorch "
            f"{report.reference_tokens.tolist()}, s2s runtime {report.export_tokens.tolist()}: either two candidate "
            "tokens are within rounding of each other, or the runtime decodes differently from the reference (a "
            "bug: please report it); pass --no-validate to keep the export anyway"
        )
    return report


def _compare_logits(export_dir: Path, manifest: Manifest, reference: TorchReference,
                    inputs: tuple[np.ndarray, np.ndarray], decoder_input_ids: np.ndarray,
                    tolerance: Tolerance) -> tuple[Comparison, ...]:
    """The graphs, stepped through the cache, against PyTorch teacher-forced on decoder_input_ids
    ([batch, tgt_len] int64): encoder output, position 0 (first step), positions 1.. (cached steps)."""
    input_ids, attention_mask = inputs
    reference_hidden, reference_logits = reference.forward(input_ids, attention_mask, decoder_input_ids)
    runner = GraphRunner(export_dir, manifest)
    encoded = runner.encode(input_ids, attention_mask)
    export_logits = runner.decode(encoded, attention_mask, decoder_input_ids)
    comparisons = []
    if reference_hidden is not None and LAST_HIDDEN_STATE in encoded:
        comparisons.append(_compare("encoder output", encoded[LAST_HIDDEN_STATE], reference_hidden, tolerance))
    comparisons.append(_compare("first decoder step logits", export_logits[:, :1], reference_logits[:, :1],
                                tolerance))
    comparisons.append(_compare("cached decoder step logits", export_logits[:, 1:], reference_logits[:, 1:],
                                tolerance))
    return tuple(comparisons)


def _same(tokens: np.ndarray, other: np.ndarray) -> bool:
    return tokens.shape == other.shape and bool((tokens == other).all())


def _transformers_over_graphs(export_dir: Path, manifest: Manifest, input_ids: np.ndarray,
                              attention_mask: np.ndarray) -> np.ndarray | None:
    """Greedy tokens of transformers' `generate` driving the exported graphs (optimum's
    ORTModelForSeq2SeqLM), with the model's generation defaults; None unless the export is in
    optimum's layout (encoder_model.onnx with a merged or split decoder): optimum cannot load the
    encoder.onnx + decoder.onnx layout of exporter/passes/cross_kv.py (its encoder has extra outputs and
    there is no first-step decoder)."""
    if manifest.encoder_file != ENCODER_FILE or manifest.decoder_file not in (MERGED_DECODER_FILE, WITH_PAST_FILE):
        return None
    import torch
    from optimum.onnxruntime import ORTModelForSeq2SeqLM

    model = ORTModelForSeq2SeqLM.from_pretrained(export_dir, provider="CPUExecutionProvider", use_io_binding=False)
    with torch.no_grad():
        tokens = model.generate(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask),
                                max_new_tokens=GREEDY_TOKENS, num_beams=1, do_sample=False)
    return tokens.numpy()


def _teacher_forced_ids(reference_tokens: np.ndarray, pad_token_id: int) -> np.ndarray:
    """The decoder inputs to compare logits on: PyTorch's greedy tokens without the last one,
    at least 2 positions (the first step and one cached step)."""
    length = max(2, reference_tokens.shape[1] - 1)
    ids = np.full((reference_tokens.shape[0], length), pad_token_id, dtype=np.int64)
    available = min(length, reference_tokens.shape[1])
    ids[:, :available] = reference_tokens[:, :available]
    return ids


def _compare(what: str, exported: np.ndarray, reference: np.ndarray, tolerance: Tolerance) -> Comparison:
    exported = exported.astype(np.float32)
    largest = float(np.abs(reference).max())
    diff = float(np.abs(exported - reference).max()) if np.isfinite(exported).all() else float("inf")
    return Comparison(what, diff, largest, tolerance.allowed(largest))


def _logits_message(comparison: Comparison, tolerance: Tolerance, precision: str) -> str:
    if comparison.max_abs_diff == float("inf"):
        hint = ("activations overflow float16; export in fp32, or use --quantize int8 for CPU"
                if precision == "fp16" else "the graphs are broken; pass --no-validate to keep them anyway")
        return f"the export's {comparison.what} contain non-finite values (inf/nan): {hint}"
    return (
        f"the export's {comparison.what} differ from PyTorch by up to {comparison.max_abs_diff:.3g}, above the "
        f"allowed {comparison.allowed:.3g} ({tolerance.describe()}; largest |PyTorch value| "
        f"{comparison.largest_reference:.3g}); pass a larger --atol to accept it, or --no-validate to skip validation"
    )
