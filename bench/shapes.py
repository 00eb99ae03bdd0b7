"""Random-weight transformers checkpoints with the shapes of real models, built locally (no download).

Speed depends on shapes, not on trained weights, so a t5-small-shaped model with random weights costs
what t5-small costs per token. Each checkpoint is built once (seeded) and cached under the bench
cache directory, keyed by its config, seed and transformers version.

The generation config is neutral on purpose: no forced BOS/EOS, no n-gram blocking, no length
penalty tricks. The benchmark measures the decoding loop; every engine is asked for the same fixed
number of new tokens (min = max), and rules CTranslate2 or optimum apply differently would only
make the engines do different work.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Shape:
    name: str
    architecture: str  # "t5" or "bart": which transformers config/model class builds it
    config: dict[str, Any] = field(hash=False)  # kwargs of T5Config / BartConfig
    like: str  # the real checkpoint whose shape this copies (or "tiny" for tests)


SHAPES: dict[str, Shape] = {
    shape.name: shape
    for shape in (
        Shape("t5-small", "t5", dict(
            vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6,
            num_heads=8, relative_attention_num_buckets=32, relative_attention_max_distance=128,
            feed_forward_proj="relu", tie_word_embeddings=True,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        ), like="google-t5/t5-small"),
        Shape("bart-base", "bart", dict(
            vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6,
            encoder_attention_heads=12, decoder_attention_heads=12,
            encoder_ffn_dim=3072, decoder_ffn_dim=3072, max_position_embeddings=1024,
            activation_function="gelu", scale_embedding=False,
            # in facebook/bart-base's config.json too; transformers ignores them, CTranslate2 reads them
            normalize_before=False, add_final_layer_norm=False, normalize_embedding=True,
            bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
            forced_bos_token_id=None, forced_eos_token_id=None,  # BartConfig defaults forced EOS on
        ), like="facebook/bart-base"),
        # For tests of bench/ itself: the t5 code path at a size that runs in milliseconds.
        Shape("tiny-t5", "t5", dict(
            vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
            num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
            feed_forward_proj="relu", tie_word_embeddings=True,
            pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
        ), like="tiny"),
    )
}


def build(shape: Shape, cache_dir: Path, seed: int = 0) -> Path:
    """Return a transformers checkpoint directory of `shape` with seeded random weights (built once)."""
    import torch
    import transformers

    key = hashlib.sha256(json.dumps(
        [shape.architecture, shape.config, seed, transformers.__version__], sort_keys=True
    ).encode()).hexdigest()[:12]
    target = cache_dir / "checkpoints" / f"{shape.name}-{key}"
    if (target / "config.json").is_file():
        return target

    config_class, model_class = {
        "t5": (transformers.T5Config, transformers.T5ForConditionalGeneration),
        "bart": (transformers.BartConfig, transformers.BartForConditionalGeneration),
    }[shape.architecture]
    config = config_class(**shape.config)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    # Only the special tokens: no forced tokens, beams or length rules (see the module docstring).
    model.generation_config = transformers.GenerationConfig(
        pad_token_id=config.pad_token_id, eos_token_id=config.eos_token_id,
        decoder_start_token_id=config.decoder_start_token_id,
    )

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{shape.name}-"))
    staging.chmod(0o755)
    try:
        model.save_pretrained(staging)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target
