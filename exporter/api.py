"""`export`: one fixed pipeline from a checkpoint to a validated export directory.

    load source -> export graphs -> passes (optimize, fp16 | int8) -> finish layout (cross-attention
    K/V into the encoder, or merged decoders; config and tokenizer files) -> kv buffers -> shared weights
    (each tensor the graphs repeat, once) -> write s2s.json -> validate -> move into place

Everything is written into a staging directory beside the output (same filesystem) and renamed into
place only when every step, validation included, succeeded; any failure removes it. So an output
directory either holds a complete, validated export or is left as it was.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from exporter.errors import GraphPassError, OutputDirError, SourceModelError
from exporter.passes.cross_kv import ENCODER_FILE as CROSS_KV_ENCODER_FILE
from exporter.passes.shared_weights import share_weights
from exporter.progress import ProgressFn, Steps
from exporter.quiet import library_output_captured, sys_path_restored
from exporter.validate import Tolerance, ValidationReport, default_tolerance, validate_export
from runtime.errors import InvalidOptionError, first_line
from runtime.manifest import ENCODER_DECODER, Manifest, installed_versions

DTYPES = ("fp32", "fp16")
QUANTIZE = ("int8", "int4")  # see exporter/passes/quantize.py
# Opsets the graphs can be exported with: optimum's seq2seq configs need 14 (Trilu, scaled dot-product
# attention), and torch.onnx's TorchScript exporter (which optimum and the custom source use) stops at 20.
MIN_OPSET, MAX_OPSET = 14, 20

# Distributions whose versions the manifest records.
_VERSIONED = ("s2s", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "onnxruntime-gpu")

# A hub id: "name" or "owner/name" (letters, digits, - _ .), never a filesystem-looking path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


@dataclass(frozen=True)
class ExportReport:
    output: Path
    manifest: Manifest
    timings: tuple[tuple[str, float], ...]  # (step, seconds), in order
    validation: ValidationReport | None  # None with validate=False
    notes: tuple[str, ...]  # things the user should know (e.g. int8 tokens that differ from fp32)
    library_messages: tuple[str, ...]  # warnings and log lines of torch/transformers/optimum/onnxruntime


def export(model: str | os.PathLike, output: str | os.PathLike, *, dtype: str = "fp32", quantize: str | None = None,
           optimize: bool = False, validate: bool = True, atol: float | None = None, force: bool = False,
           opset: int | None = None, kv_buffer: bool | None = None, greedy_head: bool | None = None,
           packed_qkv: bool | None = None, progress: ProgressFn | None = None) -> ExportReport:
    """Export `model` (a save_pretrained directory, a models/ checkpoint, or a hub id) to `output`.

    dtype: "fp32", or "fp16" (for CUDA; what overflows stays fp32). quantize: None, "int8" (int8
    weights and activations, for CPU) or "int4" (4-bit weights, int8 compute where the CPU has it);
    the scheme follows this machine's CPU features and the manifest records it (see
    exporter.passes.quantize). optimize: onnxruntime's transformer fusions. validate: compare with
    PyTorch before moving into place. atol: absolute logits tolerance (None: by precision, see
    exporter.validate.TOLERANCES). force: replace a non-empty output directory. opset: ONNX opset
    (None: optimum's default for the architecture). kv_buffer: self-attention K/V written in place in
    preallocated buffers (exporter.passes.kv_buffer); None: on where it applies, except for fp16 (CUDA),
    True: fail where it does not apply, False: off. greedy_head: greedy's next ids chosen in the decoder
    (exporter.passes.greedy_head); None: on where the kv-buffer pass ran and the output projection matches,
    True: fail where it does not apply, False: off. packed_qkv: one q/k/v projection per self-attention
    layer (exporter.passes.packed_qkv; the same numbers); None: on where the kv-buffer pass ran and a layer
    matches, True: fail where none does, False: off. progress: called with (step, None) when a step
    starts and (step, seconds) when it ends.

    Not thread-safe: the fp16 pass changes the process's working directory for a moment (see
    exporter.passes.fp16), so run one export at a time per process.

    Raises:
        InvalidOptionError: an option value is out of range, or options contradict each other.
        SourceModelError: the model is missing, unreadable or corrupt.
        UnsupportedModelError: the model is not an encoder-decoder this tool exports.
        OutputDirError: the output exists and is not empty (without force), or cannot be written.
        GraphPassError: a pass cannot process the model's graphs (fp16: a tensor onnxruntime cannot type;
            int4: onnxruntime's MatMulNBits quantizer cannot be imported).
        ValidationError: the export disagrees with PyTorch beyond the tolerance.
    """
    _check_options(dtype, quantize, atol, opset)
    output = Path(output)
    model_dir = _local_model_dir(model)
    _check_output(output, force, model_dir)
    staging = _make_staging_dir(output)
    steps = Steps(progress)
    notes: list[str] = []
    try:
        with library_output_captured() as library_messages, sys_path_restored():
            manifest, validation = _run_pipeline(model, model_dir, staging, steps, notes, dtype=dtype,
                                                 quantize=quantize, optimize=optimize, validate=validate,
                                                 atol=atol, opset=opset, kv_buffer=kv_buffer,
                                                 greedy_head=greedy_head, packed_qkv=packed_qkv)
        with steps.step("move into place"):
            _move_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportReport(output, manifest, tuple(steps.timings), validation, tuple(notes), tuple(library_messages))


def _run_pipeline(model: str | os.PathLike, model_dir: Path | None, staging: Path, steps: Steps, notes: list[str], *,
                  dtype: str, quantize: str | None, optimize: bool, validate: bool, atol: float | None,
                  opset: int | None, kv_buffer: bool | None,
                  greedy_head: bool | None, packed_qkv: bool | None) -> tuple[Manifest, ValidationReport | None]:
    from exporter.sources import load_source

    with steps.step("load model"):
        source = load_source(model_dir if model_dir is not None else _download(str(model)))
    manifest = source.export_graphs(staging, opset, steps)
    graphs = [staging / f for f in manifest.graph_files]
    inputs = source.sample_inputs() if validate or dtype == "fp16" else None  # [2, src_len] ids and mask
    passes = []
    if optimize:
        from exporter.passes.optimize import optimize_graphs

        with steps.step("optimize (fusions)"):
            fused = optimize_graphs(graphs)
        passes.append("optimize")
        notes.append("fused: " + (", ".join(f"{n} {op}" for op, n in sorted(fused.items())) or "nothing matched"))
    if dtype == "fp16":
        from exporter.passes.fp16 import convert_graphs_to_fp16

        assert inputs is not None  # taken above for fp16
        with steps.step("convert to fp16"):
            kept = convert_graphs_to_fp16(staging, manifest, inputs)
        passes.append("fp16")
        notes.append(f"fp16: {kept.describe()}")
    scheme = None
    if quantize is not None:
        from exporter.passes.quantize import cpu_flags, cpu_level, default_scheme, quantize_graphs

        scheme = default_scheme(quantize, cpu_level(cpu_flags()))
        with steps.step(f"quantize {quantize}"):
            quantize_graphs(graphs, scheme)
        passes.append(f"{quantize}-{scheme.method.replace('_', '-')}")
        notes.append(f"{quantize}: {scheme.describe()}")
    precision = quantize or dtype
    with steps.step("finish layout"):
        finished = source.finish(staging, notes)
    if finished.encoder_file == CROSS_KV_ENCODER_FILE:
        passes.append("cross-kv")
    if kv_buffer if kv_buffer is not None else dtype == "fp32":
        with steps.step("kv buffers"):
            buffered = _kv_buffers(staging, finished, notes, required=kv_buffer is True)
        if buffered is not None:
            finished = buffered
            passes.append("kv-buffer")
    if packed_qkv if packed_qkv is not None else "kv-buffer" in passes:
        with steps.step("packed qkv"):
            packed = _packed_qkv(staging, finished, notes, required=packed_qkv is True)
        if packed is not None:
            passes.append("packed-qkv")
    if greedy_head if greedy_head is not None else "kv-buffer" in passes:
        with steps.step("greedy head"):
            headed = _greedy_head(staging, finished, notes, required=greedy_head is True)
        if headed is not None:
            finished = headed
            passes.append(f"greedy-head-{headed.greedy_head}")
    with steps.step("shared weights"):
        shared = share_weights(staging, finished.graph_files)
    if shared:
        passes.append("shared-weights")
        notes.append("shared weights: " + ", ".join(
            f"{next(iter(w.names.values()))} ({w.nbytes / 2**20:.0f} MiB, {len(w.names)} graphs)" for w in shared))
    manifest = replace(finished, source=source.kind, precision=precision, passes=tuple(passes), shared_weights=shared,
                       quantization=scheme.record() if scheme else {}, versions=installed_versions(_VERSIONED))
    # The last file written: validation then reads the directory the way the runtime will.
    manifest.write(staging)
    if not validate:
        return manifest, None
    tolerance = Tolerance(atol=atol) if atol is not None else default_tolerance(precision, optimize)
    assert inputs is not None  # taken above when validating
    with steps.step("validate"):
        report = validate_export(staging, manifest, source.reference(), inputs, tolerance,
                                 tokens_required=precision == "fp32")
    if not report.tokens_match:
        notes.append(f"{precision}: greedy tokens differ from PyTorch fp32 ({report.token_agreement()}); "
                     "expected where two candidates are close, the logits are within tolerance")
    return manifest, report


def _kv_buffers(staging: Path, manifest: Manifest, notes: list[str], required: bool) -> Manifest | None:
    """The manifest after exporter.passes.kv_buffer, or None (with a note) where it does not apply.

    Raises:
        GraphPassError: required and the decoder does not match the pass.
    """
    from exporter.passes.kv_buffer import KVBufferNotApplicable, use_kv_buffers

    if not required and not any(state.kind == "grows" for state in manifest.states):
        return None  # nothing grows (an LSTM decoder): nothing to say
    return _decoder_pass(lambda: use_kv_buffers(staging, manifest), KVBufferNotApplicable, manifest, notes, required,
                         "kv_buffer", "the decoder grows its cache by Concat")


def _packed_qkv(staging: Path, manifest: Manifest, notes: list[str], required: bool) -> Manifest | None:
    """The manifest after exporter.passes.packed_qkv, or None (with a note) where no layer matches.

    Raises:
        GraphPassError: required and no layer of the decoder matches the pass.
    """
    from exporter.passes.packed_qkv import PackedQKVNotApplicable, pack_qkv

    return _decoder_pass(lambda: pack_qkv(staging, manifest), PackedQKVNotApplicable, manifest, notes, required,
                         "packed_qkv", "each layer projects q, k and v apart")


def _greedy_head(staging: Path, manifest: Manifest, notes: list[str], required: bool) -> Manifest | None:
    """The manifest after exporter.passes.greedy_head, or None (with a note) where it does not apply.

    Raises:
        GraphPassError: required and the decoder does not match the pass.
    """
    from exporter.passes.greedy_head import GreedyHeadNotApplicable, add_greedy_head

    return _decoder_pass(lambda: add_greedy_head(staging, manifest), GreedyHeadNotApplicable, manifest, notes,
                         required, "greedy_head", "greedy search takes the argmax of the logits")


def _decoder_pass(apply: Callable[[], Manifest], refusal: type[Exception], manifest: Manifest, notes: list[str],
                  required: bool, option: str, otherwise: str) -> Manifest | None:
    """Run an encoder-decoder pass that may refuse (raising `refusal`): its manifest; or, refused, an
    error where the option required it and else None with a note saying what the export does instead."""
    try:
        if manifest.kind != ENCODER_DECODER:
            raise refusal(f"a {manifest.kind} model")
        return apply()
    except refusal as why:
        if required:
            raise GraphPassError(f"{option}=True: the pass does not apply ({why}); export without it") from None
        notes.append(f"{option.replace('_', '-')}: not applied ({why}); {otherwise}")
        return None


def _check_options(dtype: str, quantize: str | None, atol: float | None, opset: int | None) -> None:
    if dtype not in DTYPES:
        raise InvalidOptionError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    if quantize is not None and quantize not in QUANTIZE:
        raise InvalidOptionError(f"quantize={quantize!r}: choose {', '.join(QUANTIZE)} (or none)")
    if quantize is not None and dtype != "fp32":
        raise InvalidOptionError(f"quantize={quantize!r} with dtype={dtype!r}: quantization starts from fp32 "
                                 "graphs; use one or the other")
    if atol is not None and not atol > 0:
        raise InvalidOptionError(f"atol={atol!r}: must be > 0")
    if opset is not None and not MIN_OPSET <= opset <= MAX_OPSET:
        raise InvalidOptionError(f"opset={opset}: must be between {MIN_OPSET} and {MAX_OPSET}")


def _local_model_dir(model: str | os.PathLike) -> Path | None:
    """The model's directory, or None for a hub id to download (checked later, in the load step).

    Raises:
        SourceModelError: a path that does not exist and cannot be a hub id, or a file.
    """
    path = Path(model)
    if path.is_dir():
        return path
    if path.exists():
        raise SourceModelError(f"{str(model)!r} is a file; pass the directory written by save_pretrained")
    if not _HUB_ID.match(str(model)):
        raise SourceModelError(f"{str(model)!r} does not exist; pass a directory written by save_pretrained")
    return None


def _download(repo_id: str) -> Path:
    """Download a hub model's config, weights and tokenizer files (or take them from the local cache).

    Raises:
        SourceModelError: the hub is unreachable and the model is not cached, or it has no such model.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "*.model", "*.spm", "*.txt", "*.safetensors"]
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=patterns))
        if not any(path.glob("*.safetensors")):  # older checkpoints ship PyTorch pickles only
            path = Path(snapshot_download(repo_id, allow_patterns=[*patterns, "pytorch_model*.bin"]))
    except LocalEntryNotFoundError:
        raise SourceModelError(f"{repo_id!r} is not a local directory and the model hub is not reachable (offline); "
                               "pass a directory written by save_pretrained") from None
    except HfHubHTTPError as err:
        raise SourceModelError(f"{repo_id!r} is not a local directory, and the model hub cannot provide it "
                               f"({first_line(err, 200)}); check the name, or pass a local directory") from None
    return path


def _check_output(output: Path, force: bool, model_dir: Path | None) -> None:
    """Refuse an output that is a file, or a non-empty directory without force (or with force, the model itself).

    Raises:
        OutputDirError
    """
    if output.is_file():
        raise OutputDirError(f"output {str(output)!r} is a file; choose a directory path with -o")
    if not output.is_dir() or not any(output.iterdir()):
        return
    if not force:
        raise OutputDirError(f"output directory {str(output)!r} exists and is not empty; choose another -o, or pass "
                             "--force to replace it")
    if model_dir is not None:
        out, source = output.resolve(), model_dir.resolve()
        if out == source or out in source.parents:
            raise OutputDirError(f"--force would replace {str(output)!r}, which holds the model being exported; "
                                 "choose another -o")


def _make_staging_dir(output: Path) -> Path:
    """A fresh directory beside the output (in its nearest existing ancestor, so the final rename stays
    on one filesystem and nothing is created where the output will go until it is complete).

    Raises:
        OutputDirError: the location cannot be written.
    """
    ancestor = output.absolute().parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise OutputDirError(f"cannot create output {str(output)!r}: {str(ancestor)!r} is a file, not a directory")
    # Not mkdtemp, which makes the directory private (0700): it becomes the output, so it gets the
    # permissions of any directory the user creates (0777 less the umask). 64 random bits: never taken.
    staging = ancestor / f".{output.name}.s2s-export-{uuid.uuid4().hex[:16]}"
    try:
        staging.mkdir(mode=0o777)
    except OSError as err:
        raise OutputDirError(f"cannot write to {str(ancestor)!r} ({err.strerror}); choose an output directory you "
                             "can write to") from None
    return staging


def _move_into_place(staging: Path, output: Path) -> None:
    """Rename the staging directory to `output`, replacing what is there (emptiness/force already checked)."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        if not output.exists():
            os.rename(staging, output)
            return
        # An old output (replaced with force, or an empty directory) is renamed aside first, so that
        # the output path is never missing a complete export for longer than two renames.
        aside = Path(tempfile.mkdtemp(prefix=f".{output.name}.s2s-old-", dir=output.parent))
        os.rename(output, aside / output.name)
        try:
            os.rename(staging, output)
        except OSError:
            os.rename(aside / output.name, output)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    except OSError as err:
        raise OutputDirError(f"cannot move the export into {str(output)!r} ({err.strerror}); the output was left "
                             "as it was") from None

