"""optimum's ORTModelForSeq2SeqLM: its default export (encoder, decoder, decoder with past) and `generate`."""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.engines import cache_path, set_torch_threads
from bench.sources import ModelSource


def unavailable(device: str) -> str | None:
    if importlib.util.find_spec("optimum") is None or importlib.util.find_spec("optimum.onnxruntime") is None:
        return "optimum-onnx is not installed (pip install 's2s[bench]')"
    import onnxruntime as ort

    if device == "cuda" and "CUDAExecutionProvider" not in ort.get_available_providers():
        return "this onnxruntime build has no CUDA provider (install onnxruntime-gpu)"
    return None


def precisions(device: str) -> tuple[str, ...]:
    # int8: optimum's own ORTQuantizer (dynamic, per-tensor) with the AutoQuantizationConfig for this CPU.
    return ("fp32",) if device == "cuda" else ("fp32", "int8")


def prepare(source: ModelSource, precision: str, device: str, cache_dir: Path) -> Path:
    if source.checkpoint_format != "transformers":
        raise LookupError("runs transformers checkpoints only; this model is "
                          + ("a models/ checkpoint" if source.checkpoint else "an export directory only"))
    import optimum.version

    variant = "int8-ortquantizer" if precision == "int8" else precision  # not the int8 of earlier bench versions
    target = cache_path(cache_dir, "optimum", source.checkpoint, variant, optimum.version.__version__)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".optimum-"))
    try:
        if precision == "fp32":
            from optimum.onnxruntime import ORTModelForSeq2SeqLM

            ORTModelForSeq2SeqLM.from_pretrained(source.checkpoint, export=True).save_pretrained(staging)
        else:
            fp32 = prepare(source, "fp32", device, cache_dir)
            _quantize_int8(fp32, staging)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _quantize_int8(fp32_dir: Path, out_dir: Path) -> None:
    """Copy an optimum directory with every graph quantized the way optimum's users quantize it: its
    ORTQuantizer, dynamic and per-tensor, with the AutoQuantizationConfig of this CPU's instruction set
    (the peer as people run it, not with s2s's own scheme; the quantized graphs replace the originals)."""
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    from exporter.passes.quantize import cpu_flags

    flags = cpu_flags()
    preset = "avx512_vnni" if "avx512_vnni" in flags else "avx512" if "avx512f" in flags else "avx2"
    config = getattr(AutoQuantizationConfig, preset)(is_static=False, per_channel=False)
    shutil.copytree(fp32_dir, out_dir, dirs_exist_ok=True)
    for graph in sorted(out_dir.glob("*.onnx")):
        quantized = ORTQuantizer.from_pretrained(out_dir, file_name=graph.name).quantize(
            quantization_config=config, save_dir=out_dir, file_suffix="quantized")
        for written in out_dir.glob(f"{graph.stem}_quantized.onnx*"):
            written.replace(out_dir / written.name.replace("_quantized", ""))
        del quantized


class OptimumRunner:
    def __init__(self, model_dir: Path, device: str, threads: int):
        import onnxruntime as ort
        import torch
        from optimum.onnxruntime import ORTModelForSeq2SeqLM

        set_torch_threads(threads)  # generate's own tensor work (logits processing, argmax) runs in torch
        self._torch = torch
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
        self.model = ORTModelForSeq2SeqLM.from_pretrained(model_dir, provider=provider, session_options=options,
                                                          use_merged=False)  # the layout its export wrote
        self._device = device

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, num_beams: int,
                 new_tokens: int) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=torch.from_numpy(input_ids).to(self._device),
                attention_mask=torch.from_numpy(attention_mask).to(self._device),
                num_beams=num_beams, do_sample=False, min_new_tokens=new_tokens, max_new_tokens=new_tokens,
            )
        return out.cpu().numpy()

    def sessions(self) -> dict[str, Any]:
        parts = {"encoder": self.model.encoder, "decoder": self.model.decoder,
                 "decoder_with_past": self.model.decoder_with_past}
        return {name: part.session for name, part in parts.items() if part is not None}


def load(artefact: Path, source: ModelSource, device: str, precision: str, threads: int) -> OptimumRunner:
    return OptimumRunner(artefact, device, threads)
