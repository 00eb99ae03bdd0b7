"""Validation of the two other kinds of export (exporter/validate.py handles encoder-decoders).

Decoder-only (models/ SimpleDecoderOnly, DecoderOnly), on left-padded sample prompts:
1. logits: decoder.onnx run with plain onnxruntime sessions (no runtime code), the whole prompt in one
   run and then PyTorch's greedy tokens one per run through the cache, against PyTorch's full forward
   (torch's own modules, no cache) over the same sequence: "prompt logits" (real positions only) and
   "cached step logits";
2. tokens: greedy generation by the s2s runtime loading the directory, and by the models/ reference.

Regressor (models/ SimpleEncoderDecoder), on seeded float samples, with plain sessions:
1. "encoder output"; 2. "teacher-forced outputs" (the whole target in one decoder run);
3. "rollout outputs": the s2s runtime's `rollout` (so the manifest is read the way users read it)
   against models/'s, from a fixed start, feeding back each output (or its fixed random projection
   when output_dim != hidden_dim). A regressor has no tokens: the report's token arrays are empty.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from exporter.errors import ValidationError
from exporter.graph_runner import cpu_session
from exporter.validate import GREEDY_TOKENS, Comparison, Tolerance, ValidationReport, checked_report
from runtime.manifest import (
    ATTENTION_MASK,
    DECODER_INPUTS,
    DECODER_ONLY,
    INPUT_IDS,
    LAST_HIDDEN_STATE,
    LOGITS,
    OUTPUTS,
    SRC,
    Manifest,
)
from runtime.sessions import ORT_TYPES

ROLLOUT_STEPS = 6


def validate_other_kind(export_dir: Path, manifest: Manifest, reference, inputs: tuple[np.ndarray, np.ndarray],
                        tolerance: Tolerance, tokens_required: bool) -> ValidationReport:
    """Validate a decoder-only or regressor export (see the module docstring).

    reference: the source's reference (exporter/sources/custom_decoder_only.py, custom_regressor.py);
    inputs: its sample_inputs().

    Raises:
        ValidationError: outputs differ beyond the tolerance (or are not finite), or, when
            tokens_required, a decoder-only model's greedy tokens differ.
    """
    if manifest.kind == DECODER_ONLY:
        return _validate_decoder_only(export_dir, manifest, reference, inputs, tolerance, tokens_required)
    return _validate_regressor(export_dir, manifest, reference, inputs, tolerance)


def _validate_decoder_only(export_dir, manifest, reference, inputs, tolerance, tokens_required) -> ValidationReport:
    from runtime.decoder_only import DecoderOnlyModel

    prompt_ids, attention_mask = inputs
    reference_tokens = reference.generate(prompt_ids, attention_mask, GREEDY_TOKENS)  # [batch, prompt + new]
    sequence = reference_tokens[:, :-1] if reference_tokens.shape[1] > prompt_ids.shape[1] + 1 else reference_tokens
    mask = np.concatenate([attention_mask, np.ones((sequence.shape[0], sequence.shape[1] - prompt_ids.shape[1]),
                                                   dtype=np.int64)], axis=1)
    expected = reference.forward(sequence, mask)  # [batch, seq, vocab]
    exported = _decoder_only_logits(export_dir / manifest.decoder_file, manifest, sequence, mask, prompt_ids.shape[1])
    prompt_len = prompt_ids.shape[1]
    real = attention_mask.astype(bool)
    comparisons = (_compare("prompt logits", exported[:, :prompt_len][real], expected[:, :prompt_len][real], tolerance),
                   _compare("cached step logits", exported[:, prompt_len:], expected[:, prompt_len:], tolerance))
    _raise_if_off(comparisons, tolerance)
    model = DecoderOnlyModel(export_dir, manifest, provider="cpu")
    export_tokens = model.generate(prompt_ids, attention_mask, max_new_tokens=GREEDY_TOKENS, num_beams=1,
                                   do_sample=False)
    return checked_report(ValidationReport(tolerance, comparisons, reference_tokens, export_tokens, None,
                                           tokens_required))


def _decoder_only_logits(path: Path, manifest: Manifest, sequence: np.ndarray, mask: np.ndarray,
                         prompt_len: int) -> np.ndarray:
    """The graph's logits [batch, seq, vocab] float32 for sequence ([batch, seq] int64, mask alike): the
    first prompt_len positions in one run from empty caches, then one position per run."""
    session = cpu_session(path)
    declared = {i.name: i for i in session.get_inputs()}
    names = [o.name for o in session.get_outputs()]
    states: dict[str, np.ndarray] = {}
    for s in manifest.states:
        shape = [sequence.shape[0] if axis == s.batch_axis else 0 if axis == s.seq_axis else dim
                 for axis, dim in enumerate(declared[s.input_name].shape)]
        states[s.input_name] = np.zeros(shape, dtype=ORT_TYPES[declared[s.input_name].type])
    logits = []
    for begin, end in [(0, prompt_len)] + [(t, t + 1) for t in range(prompt_len, sequence.shape[1])]:
        feeds = {INPUT_IDS: sequence[:, begin:end], ATTENTION_MASK: mask[:, :end], **states}
        outputs = dict(zip(names, session.run(names, feeds)))
        states = {s.input_name: outputs[s.output_name] for s in manifest.states}
        logits.append(outputs[LOGITS].astype(np.float32))
    return np.concatenate(logits, axis=1)


def _validate_regressor(export_dir, manifest, reference, inputs, tolerance) -> ValidationReport:
    from runtime.regressor import RegressorModel

    src, trg = inputs
    states = manifest.states
    encoder = cpu_session(export_dir / manifest.encoder_file)
    decoder = cpu_session(export_dir / manifest.decoder_file)
    encoded = dict(zip([o.name for o in encoder.get_outputs()], encoder.run(None, {SRC: src})))
    feeds = {DECODER_INPUTS: trg, **{s.input_name: encoded[s.encoder_output] for s in states}}
    teacher_forced = decoder.run([OUTPUTS], feeds)[0]
    features = manifest.features
    rng = np.random.default_rng(0)
    start = rng.standard_normal(features.decoder_input_dim).astype(np.float32)
    projection = None if features.output_dim == features.decoder_input_dim else \
        rng.standard_normal((features.output_dim, features.decoder_input_dim)).astype(np.float32)
    feedback = None if projection is None else (lambda outputs: outputs @ projection)
    rollout = RegressorModel(export_dir, manifest, provider="cpu").rollout(src, ROLLOUT_STEPS, start=start,
                                                                           feedback=feedback)
    comparisons = (_compare("encoder output", encoded[LAST_HIDDEN_STATE], reference.encode(src), tolerance),
                   _compare("teacher-forced outputs", teacher_forced, reference.forward(src, trg), tolerance),
                   _compare("rollout outputs", rollout, reference.rollout(src, ROLLOUT_STEPS, start, projection),
                            tolerance))
    _raise_if_off(comparisons, tolerance)
    no_tokens = np.zeros((src.shape[0], 0), dtype=np.int64)
    return ValidationReport(tolerance, comparisons, no_tokens, no_tokens, None, tokens_required=False)


def _compare(what: str, exported: np.ndarray, reference: np.ndarray, tolerance: Tolerance) -> Comparison:
    exported = exported.astype(np.float32)
    largest = float(np.abs(reference).max())
    diff = float(np.abs(exported - reference).max()) if np.isfinite(exported).all() else float("inf")
    return Comparison(what, diff, largest, tolerance.allowed(largest))


def _raise_if_off(comparisons: tuple[Comparison, ...], tolerance: Tolerance) -> None:
    for c in comparisons:
        if c.max_abs_diff == float("inf"):
            raise ValidationError(f"the export's {c.what} contain non-finite values (inf/nan); pass --no-validate "
                                  "to keep the export anyway")
        if not c.ok:
            raise ValidationError(
                f"the export's {c.what} differ from PyTorch by up to {c.max_abs_diff:.3g}, above the allowed "
                f"{c.allowed:.3g} ({tolerance.describe()}; largest |PyTorch value| {c.largest_reference:.3g}); pass "
                "a larger --atol to accept it, or --no-validate to skip validation")
