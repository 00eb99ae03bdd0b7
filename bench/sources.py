"""What `--model` names: a built-in shape, the bundled demo model, or a directory on disk.

A `ModelSource` says where each engine finds the model: a transformers checkpoint (eager PyTorch,
optimum and CTranslate2 need one; s2s exports it) and/or a ready s2s export directory (s2s only).
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


@dataclass(frozen=True)
class ModelSource:
    name: str  # how the report names it: "t5-small", "demo", or the directory's name
    checkpoint: Path | None  # transformers `save_pretrained` directory; None: no PyTorch/optimum/ct2 peer
    export_dir: Path | None  # a ready s2s export (used as-is for its precision); None: s2s exports checkpoint
    vocab_size: int
    eos_token_id: int
    decoder_start_token_id: int
    special_ids: tuple[int, ...]  # pad/eos/bos/start: never drawn as input tokens

    def inputs(self, batch_size: int, src_len: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Seeded random source ids ending in EOS, like a tokenizer's output; the same for every engine.

        Returns input_ids, attention_mask: [batch_size, src_len] int64 (no padding: every row is src_len long).
        """
        rng = np.random.default_rng([seed, batch_size, src_len])
        low = max(self.special_ids) + 1
        input_ids = rng.integers(low, self.vocab_size, size=(batch_size, src_len), dtype=np.int64)
        input_ids[:, -1] = self.eos_token_id
        return input_ids, np.ones_like(input_ids)


def resolve(spec: str, cache_dir: Path, seed: int = 0) -> ModelSource:
    """Turn one `--model` value into a ModelSource (building a shape's checkpoint on first use).

    Raises:
        InvalidOptionError: neither a shape name, "demo", nor an existing directory.
        ExportDirError: the demo model is asked for but not there, or a directory is neither a
            transformers checkpoint nor an s2s export.
    """
    if spec in SHAPES:
        return _from_checkpoint(spec, build(SHAPES[spec], cache_dir, seed))
    if spec == "demo":
        if not DEMO_DIR.is_dir():
            raise ExportDirError(f"the bundled demo model is not in {DEMO_DIR}; create it with `python -m models.demo`")
        return from_directory(DEMO_DIR, name="demo")
    path = Path(spec)
    if not path.exists():
        raise InvalidOptionError(
            f"--model {spec!r}: expected one of {', '.join(sorted(SHAPES))}, 'demo', or a directory; "
            "found no such directory"
        )
    return from_directory(path, name=path.resolve().name)


def from_directory(path: Path, name: str) -> ModelSource:
    """An s2s export directory (s2s.json) or a transformers checkpoint (config.json)."""
    if (path / MANIFEST_NAME).is_file():
        manifest = Manifest.read(path)
        return ModelSource(
            name=name, checkpoint=None, export_dir=path, vocab_size=manifest.vocab_size,
            eos_token_id=manifest.eos_token_ids[0], decoder_start_token_id=manifest.decoder_start_token_id,
            special_ids=(manifest.pad_token_id, *manifest.eos_token_ids, manifest.decoder_start_token_id),
        )
    if (path / "config.json").is_file():
        return _from_checkpoint(name, path)
    raise ExportDirError(
        f"{str(path)!r} has neither {MANIFEST_NAME} (an s2s export) nor config.json (a transformers checkpoint); "
        "pass one of those, a shape name or 'demo'"
    )


def _from_checkpoint(name: str, checkpoint: Path) -> ModelSource:
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    generation_file = checkpoint / "generation_config.json"
    if generation_file.is_file():  # generation_config.json wins over config.json, as in transformers
        config.update({k: v for k, v in json.loads(generation_file.read_text(encoding="utf-8")).items()
                       if v is not None})
    eos = config["eos_token_id"]
    eos = eos[0] if isinstance(eos, list) else eos
    start = config.get("decoder_start_token_id")
    start = config["pad_token_id"] if start is None else start  # T5 and Marian start from pad
    special = tuple(i for i in (config.get("pad_token_id"), config.get("bos_token_id"), eos, start) if i is not None)
    return ModelSource(name=name, checkpoint=checkpoint, export_dir=None, vocab_size=config["vocab_size"],
                       eos_token_id=eos, decoder_start_token_id=start, special_ids=special)
