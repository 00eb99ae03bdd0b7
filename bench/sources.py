"""What `--model` names: a built-in shape, the bundled demo model, or a directory on disk.

A `ModelSource` says where each engine finds the model: PyTorch weights (a transformers checkpoint,
which eager PyTorch, optimum and CTranslate2 run, or a models/ checkpoint, which eager PyTorch runs
with models.generate; s2s exports either) and/or a ready s2s export directory (s2s only).
It also carries the special token ids the benchmark inputs are built around.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.shapes import SHAPES, build
from runtime.errors import ExportDirError, InvalidOptionError
from runtime.manifest import MANIFEST_NAME, Manifest

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO_ROOT / "models" / "demo"
MODELS_CONFIG = "s2s_model.json"  # a models/ checkpoint (see models/checkpoint.py)
OPTIMUM_ENCODER = "encoder_model.onnx"  # the mark of a directory written by `optimum-cli export onnx`
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


@dataclass(frozen=True)
class ModelSource:
    name: str  # how the report names it: "t5-small", "demo", or the directory's name
    checkpoint: Path | None  # PyTorch weights (eager; optimum and CTranslate2 need "transformers"); None: none
    checkpoint_format: str | None  # "transformers" (save_pretrained) or "models" (a models/ checkpoint)
    export_dir: Path | None  # a ready export (s2s-export's, or optimum-cli's); None: s2s exports checkpoint
    export_precision: str | None  # what export_dir holds ("fp32", "int8", "fp16"): s2s runs only that one
    vocab_size: int
    pad_token_id: int
    eos_token_id: int
    decoder_start_token_id: int

    @property
    def length_rule(self) -> str:
        """How every engine is made to do the same work.

        "min_new_tokens": min = max new tokens (EOS banned until the last position), which transformers,
        optimum, CTranslate2 and s2s all support: exactly new_tokens per row. "eos": up to new_tokens,
        a row stopping at its EOS; for models/ checkpoints, whose reference generate (the eager engine
        there) has no minimum-length rule. Engines that produce the same tokens then did the same work.
        """
        return "eos" if self.checkpoint_format == "models" else "min_new_tokens"

    def inputs(self, batch_size: int, src_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Seeded random source ids ending in EOS, like a tokenizer's output; the same for every engine.

        Returns input_ids, attention_mask: [batch_size, src_len] int64 (no padding: every row is src_len long).
        """
        rng = np.random.default_rng([seed, batch_size, src_len])
        low = max(self.pad_token_id, self.eos_token_id, self.decoder_start_token_id) + 1  # ordinary tokens only
        input_ids = rng.integers(low, self.vocab_size, size=(batch_size, src_len), dtype=np.int64)
        input_ids[:, -1] = self.eos_token_id
        return input_ids, np.ones_like(input_ids)


def resolve(spec: str, cache_dir: Path, seed: int = 0) -> ModelSource:
    """Turn one `--model` value into a ModelSource (building a shape's checkpoint on first use).

    Raises:
        InvalidOptionError: neither a shape name, "demo", nor an existing directory.
        ExportDirError: the demo model is asked for but not there, or a directory holds none of the
            layouts `from_directory` reads.
    """
    if spec in SHAPES:
        return from_directory(build(SHAPES[spec], cache_dir, seed), name=spec)
    if spec == "demo":
        if not DEMO_DIR.is_dir():
            raise ExportDirError(f"the bundled demo model is not in {DEMO_DIR}; "
                                 "train it with `s2s-train -o models/demo --threads 1`")
        return from_directory(DEMO_DIR, name="demo")
    path = Path(spec)
    if not path.exists():
        raise InvalidOptionError(
            f"--model {spec!r}: expected one of {', '.join(sorted(SHAPES))}, 'demo', or a directory; "
            "found no such directory"
        )
    return from_directory(path, name=path.resolve().name)


def from_directory(path: Path, name: str) -> ModelSource:
    """An export directory (s2s.json, or optimum-cli's layout), a transformers checkpoint (config.json and
    weights), a models/ checkpoint (s2s_model.json), or a directory holding an export beside its checkpoint."""
    manifest = export_manifest(path)
    if (path / MODELS_CONFIG).is_file():
        checkpoint_format = "models"
        config = json.loads((path / MODELS_CONFIG).read_text(encoding="utf-8"))
        tokens = dict(config["special_tokens"], vocab_size=config["args"]["vocab_size"])
    elif (path / "config.json").is_file() and any((path / weights).is_file() for weights in WEIGHT_FILES):
        checkpoint_format, tokens = "transformers", _transformers_tokens(path)
    elif manifest is not None:  # an export (its config.json is the model's config, without weights)
        checkpoint_format, tokens = None, {}
    else:
        raise ExportDirError(
            f"{str(path)!r} holds neither {MANIFEST_NAME} (an s2s export), {OPTIMUM_ENCODER} (an optimum-cli export), "
            f"config.json with weights (a transformers checkpoint) nor {MODELS_CONFIG} (a models/ checkpoint); pass "
            "one of those, a shape name or 'demo'"
        )
    if manifest is not None:  # the export's own ids win: they are what the runtime will use
        tokens = dict(vocab_size=manifest.vocab_size, pad_token_id=manifest.pad_token_id,
                      eos_token_id=manifest.eos_token_ids[0], decoder_start_token_id=manifest.decoder_start_token_id)
    return ModelSource(name=name, checkpoint=path if checkpoint_format else None, checkpoint_format=checkpoint_format,
                       export_dir=path if manifest else None, export_precision=manifest.precision if manifest else None,
                       **tokens)


def export_manifest(path: Path) -> Manifest | None:
    """The manifest of an export in `path` (s2s.json, or derived from an optimum-cli directory), or None."""
    if (path / MANIFEST_NAME).is_file():
        return Manifest.read(path)
    if (path / OPTIMUM_ENCODER).is_file():
        from runtime.optimum_layout import manifest_from_optimum_dir

        return manifest_from_optimum_dir(path)
    return None


def _transformers_tokens(checkpoint: Path) -> dict[str, int]:
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    generation_file = checkpoint / "generation_config.json"
    if generation_file.is_file():  # generation_config.json wins over config.json, as in transformers
        config.update({k: v for k, v in json.loads(generation_file.read_text(encoding="utf-8")).items()
                       if v is not None})
    eos = config["eos_token_id"]
    start = config.get("decoder_start_token_id")
    return dict(vocab_size=config["vocab_size"], pad_token_id=config["pad_token_id"],
                eos_token_id=eos[0] if isinstance(eos, list) else eos,
                decoder_start_token_id=config["pad_token_id"] if start is None else start)  # T5, Marian: pad
