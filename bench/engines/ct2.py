"""CTranslate2: the checkpoint converted once (fp32 weights), run at the precision asked for (compute_type).

CTranslate2 speaks token strings, not ids. A checkpoint with a tokenizer is converted with it; the
random-weight shapes have none, so the converter is given a stand-in vocabulary ("<id>" strings with
the config's special ids). Either way ids map to strings through the converted model's own vocabulary
file, so its outputs compare with the other engines' id for id.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.engines import cache_path
from bench.sources import ModelSource
from runtime.errors import first_line

COMPUTE_TYPES = {("cpu", "fp32"): "float32", ("cpu", "int8"): "int8",
                 ("cuda", "fp32"): "float32", ("cuda", "fp16"): "float16", ("cuda", "int8"): "int8_float16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json", "source.spm")


def unavailable(device: str) -> str | None:
    if importlib.util.find_spec("ctranslate2") is None:
        return "ctranslate2 is not installed (pip install ctranslate2)"
    if device == "cuda":
        import ctranslate2

        if ctranslate2.get_cuda_device_count() == 0:
            return "ctranslate2 sees no CUDA device"
    return None


def precisions(device: str) -> tuple[str, ...]:
    return tuple(p for d, p in COMPUTE_TYPES if d == device)


def prepare(source: ModelSource, precision: str, device: str, cache_dir: Path) -> Path:
    if source.checkpoint_format != "transformers":
        raise LookupError("runs transformers checkpoints only; this model is "
                          + ("a models/ checkpoint" if source.checkpoint else "an export directory only"))
    import ctranslate2

    target = cache_path(cache_dir, "ct2", source.checkpoint, ctranslate2.__version__)
    if (target / "model.bin").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".ct2-"))
    try:
        _converter(source.checkpoint).convert(str(staging / "model"))
        (staging / "model").rename(target)
    except ValueError as err:  # the converter's "No conversion is registered for ..." and friends
        raise LookupError(f"CTranslate2 cannot convert this model: {first_line(err)}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _converter(checkpoint: Path):
    from ctranslate2.converters import TransformersConverter

    if any((checkpoint / name).is_file() for name in TOKENIZER_FILES):
        return TransformersConverter(str(checkpoint))

    class StandInTokenizerConverter(TransformersConverter):
        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return _StandInTokenizer(json.loads((checkpoint / "config.json").read_text(encoding="utf-8")))

    return StandInTokenizerConverter(str(checkpoint))


class _StandInTokenizer:
    """The part of a transformers tokenizer that CTranslate2's converter reads: token i is "<i>"."""

    def __init__(self, config: dict[str, Any]):
        self._size = config["vocab_size"]
        special = {name: config.get(f"{name}_token_id") for name in ("pad", "eos", "bos")}
        special = {name: i for name, i in special.items() if i is not None}
        # The converter wants an unknown token; any id that is not already special will do.
        special["unk"] = min(set(range(self._size)) - set(special.values()))
        for name, token_id in special.items():
            setattr(self, f"{name}_token", self.token(token_id))
        self.special_tokens_map = {f"{name}_token": self.token(i) for name, i in special.items()}

    @staticmethod
    def token(token_id: int) -> str:
        return f"<{token_id}>"

    def get_vocab(self) -> dict[str, int]:
        return {self.token(i): i for i in range(self._size)}

    def convert_ids_to_tokens(self, ids):
        return self.token(ids) if isinstance(ids, int) else [self.token(i) for i in ids]


class CT2Runner:
    def __init__(self, model_dir: Path, source: ModelSource, device: str, precision: str, threads: int):
        import ctranslate2

        self._translator = ctranslate2.Translator(str(model_dir), device=device,
                                                  compute_type=COMPUTE_TYPES[(device, precision)],
                                                  intra_threads=threads, inter_threads=1)
        self._source_tokens = np.array(_vocabulary(model_dir, "source"), dtype=object)  # id -> token string
        self._target_ids = {token: i for i, token in enumerate(_vocabulary(model_dir, "target"))}
        self._start = source.decoder_start_token_id

    def generate(self, input_ids: np.ndarray, attention_mask: np.ndarray, num_beams: int,
                 new_tokens: int) -> np.ndarray:
        source = [self._source_tokens[row[mask.astype(bool)]].tolist() for row, mask in zip(input_ids, attention_mask)]
        results = self._translator.translate_batch(
            source, beam_size=num_beams, num_hypotheses=1, max_input_length=0,
            min_decoding_length=new_tokens, max_decoding_length=new_tokens,
        )
        out = np.empty((len(results), 1 + new_tokens), dtype=np.int64)
        out[:, 0] = self._start
        for row, result in zip(out, results):
            row[1:] = [self._target_ids[token] for token in result.hypotheses[0]]
        return out

    def sessions(self) -> dict[str, Any]:
        return {}


def _vocabulary(model_dir: Path, side: str) -> list[str]:
    """The converted model's token strings of `side` ("source" or "target"), in id order."""
    for stem in ("shared_vocabulary", f"{side}_vocabulary"):
        if (model_dir / f"{stem}.json").is_file():
            return json.loads((model_dir / f"{stem}.json").read_text(encoding="utf-8"))
        if (model_dir / f"{stem}.txt").is_file():  # older converters: one token per line
            return (model_dir / f"{stem}.txt").read_text(encoding="utf-8").split("\n")[:-1]
    raise LookupError(f"no {side} vocabulary file in {model_dir}; re-convert the model")


def load(artefact: Path, source: ModelSource, device: str, precision: str, threads: int) -> CT2Runner:
    return CT2Runner(artefact, source, device, precision, threads)
