"""`s2s-train`: train a models/ architecture, or a small HF T5, on the built-in instruction mix.

    s2s-train -o out/efficient                                   # the demo's recipe (a few minutes, 2 cores)
    s2s-train -o out/lstm --model EnhancedEncoderDecoder --d-model 256 --steps 3000
    s2s-train -o out/lm --model SimpleDecoderOnly --d-model 120 --layers 4   # decoder-only, as many parameters
    s2s-train -o out/t5 --model t5                               # a T5ForConditionalGeneration, save_pretrained

Writes a checkpoint directory that `s2s-export` takes (models/: s2s_model.json + model.safetensors +
tokenizer.json; t5: transformers' save_pretrained files plus tokenizer.json) and prints the exact-match
accuracy of greedy decoding on held-out instructions that training never sees.

A decoder-only model learns the same pairs as one sequence: the instruction as the encoder-decoders'
encoder reads it (its tokens and the EOS the tokenizer appends), then the answer and EOS; the loss
counts the answer and its EOS only. It answers by continuing the instruction (`generate_from_prompt`).
The regressor (SimpleEncoderDecoder) has no tokens and is not trained here.
"""

from __future__ import annotations

import inspect
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path

import click
import torch
from tokenizers import Tokenizer
from torch import nn

from models import MODEL_CLASSES
from models.checkpoint import ModelConfig, save_checkpoint
from models.evaluate import encode_sources, exact_match, predict
from models.tasks import TASKS, held_out_examples, make_example, training_batches
from models.tokenizer import EOS, PAD, UNK, special_token_ids, train_tokenizer
from runtime.clickutil import S2SCommand
from runtime.manifest import DECODER_ONLY

T5 = "t5"
TOKENIZER_CORPUS = 20000  # examples the tokenizer is trained on
MAX_NEW_TOKENS = 16  # longest answer (11 tokens) + EOS, with room
# what s2s-train trains: the models/ classes that work on tokens (the regressor does not), and T5
TRAINABLE = sorted(name for name, cls in MODEL_CLASSES.items() if cls.special_tokens) + [T5]


def _model_args(class_name: str, vocab_size: int, d_model: int, heads: int, layers: int,
                dropout: float, positional_encoding: str) -> dict:
    """Constructor args of `class_name` from the command's size options (whatever names the class uses)."""
    params = inspect.signature(MODEL_CLASSES[class_name]).parameters
    values = {"vocab_size": vocab_size, "hidden_size": d_model, "d_model": d_model, "nhead": heads,
              "num_layers": layers, "num_encoder_layers": layers, "num_decoder_layers": layers,
              # nn.Transformer's default 2048 would dwarf a small model: use the usual 4 * d_model
              "dim_feedforward": 4 * d_model, "dropout": dropout, "positional_encoding": positional_encoding}
    return {name: values[name] for name in params if name in values}


def _batch_tensors(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], start_id: int, eos_id: int):
    """(input_ids, attention_mask, decoder_input_ids, labels): [batch, len] int64; labels -100 at padding."""
    sources = [e.ids for e in tokenizer.encode_batch([s for s, _ in pairs])]
    targets = [e.ids + [eos_id] for e in tokenizer.encode_batch([t for _, t in pairs], add_special_tokens=False)]
    src_len, tgt_len = max(map(len, sources)), max(map(len, targets))
    input_ids = torch.zeros(len(pairs), src_len, dtype=torch.int64)
    attention_mask = torch.zeros_like(input_ids)
    decoder_input_ids = torch.zeros(len(pairs), tgt_len, dtype=torch.int64)
    labels = torch.full((len(pairs), tgt_len), -100, dtype=torch.int64)
    for row, (src, tgt) in enumerate(zip(sources, targets)):
        input_ids[row, : len(src)] = torch.tensor(src)
        attention_mask[row, : len(src)] = 1
        decoder_input_ids[row, : len(tgt)] = torch.tensor([start_id] + tgt[:-1])
        labels[row, : len(tgt)] = torch.tensor(tgt)
    return input_ids, attention_mask, decoder_input_ids, labels


def _lm_batch_tensors(tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]], pad_id: int, eos_id: int):
    """A decoder-only model's (input_ids, attention_mask, labels): [batch, len] int64, padded on the right
    (training needs no left padding: causal attention never reads the padding after a row).

    Each row is instruction (with its EOS) + answer + EOS, shifted by one for the labels; labels are -100
    on the instruction and the padding, so only the answer is learned.
    """
    sources = [e.ids for e in tokenizer.encode_batch([s for s, _ in pairs])]
    targets = [e.ids + [eos_id] for e in tokenizer.encode_batch([t for _, t in pairs], add_special_tokens=False)]
    length = max(len(src) + len(tgt) for src, tgt in zip(sources, targets)) - 1
    input_ids = torch.full((len(pairs), length), pad_id, dtype=torch.int64)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full((len(pairs), length), -100, dtype=torch.int64)
    for row, (src, tgt) in enumerate(zip(sources, targets)):
        sequence = torch.tensor(src + tgt)
        input_ids[row, : len(sequence) - 1] = sequence[:-1]
        attention_mask[row, : len(sequence) - 1] = 1
        labels[row, len(src) - 1: len(sequence) - 1] = sequence[len(src):]
    return input_ids, attention_mask, labels


def _t5(vocab_size: int, d_model: int, heads: int, layers: int, dropout: float, tokens: dict[str, int]) -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=vocab_size, d_model=d_model, d_kv=d_model // heads, d_ff=4 * d_model,
                      num_layers=layers, num_heads=heads, dropout_rate=dropout, pad_token_id=tokens["pad_token_id"],
                      eos_token_id=tokens["eos_token_id"], decoder_start_token_id=tokens["pad_token_id"])
    return T5ForConditionalGeneration(config)


def train(output: Path, model_name: str = "EfficientInstructionLLM", *, d_model: int = 128, heads: int = 4,
          layers: int = 2, dropout: float = 0.0, positional_encoding: str = "sinusoidal", steps: int = 1000,
          batch_size: int = 64, lr: float = 1e-3, warmup: int = 100, seed: int = 0, held_out_per_task: int = 100,
          log=print) -> float:
    """Train, save into `output`, and return the held-out greedy exact-match accuracy."""
    torch.manual_seed(seed)
    held_out = held_out_examples(held_out_per_task)
    excluded = {source for source, _ in held_out}
    rng = random.Random(seed + 1)
    corpus = [make_example(rng, rng.choice(TASKS)) for _ in range(TOKENIZER_CORPUS)]
    tokenizer = train_tokenizer(text for pair in corpus for text in pair)
    tokens = special_token_ids(tokenizer)
    vocab_size = tokenizer.get_vocab_size()
    if model_name == T5:
        model = _t5(vocab_size, d_model, heads, layers, dropout, tokens)
        # T5 starts decoding from <pad>, and shifts labels itself
        start_id = tokens["pad_token_id"]
    else:
        args = _model_args(model_name, vocab_size, d_model, heads, layers, dropout, positional_encoding)
        class_tokens = {name: tokens[name] for name in MODEL_CLASSES[model_name].special_tokens}
        config = ModelConfig(model_name, args, class_tokens, {"max_new_tokens": MAX_NEW_TOKENS})
        model = config.build()
        if getattr(model, "embed_scale", 1.0) != 1.0:
            # nn.Embedding starts at N(0, 1): times sqrt(d_model) that would drown the positional
            # encoding (amplitude 1). Start at N(0, 1/d_model), as the Transformer paper's models do.
            nn.init.normal_(model.embedding.weight, std=1.0 / model.embed_scale)
        start_id = tokens["decoder_start_token_id"]
    parameters = sum(p.numel() for p in model.parameters())
    log(f"{model_name}: {parameters / 1e6:.2f}M parameters, vocabulary {vocab_size}, {steps} steps of {batch_size}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    # linear warm-up, then cosine decay to zero
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(s, steps) / steps)))
    loss_fn = nn.CrossEntropyLoss(ignore_index=-100)
    batches = training_batches(batch_size, excluded, seed)
    model.train()
    started = time.perf_counter()
    decoder_only = getattr(model, "kind", None) == DECODER_ONLY
    for step in range(1, steps + 1):
        if decoder_only:
            input_ids, attention_mask, labels = _lm_batch_tensors(tokenizer, next(batches), tokens["pad_token_id"],
                                                                  tokens["eos_token_id"])
            logits = model.full_forward(input_ids, attention_mask)
            loss = loss_fn(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        else:
            input_ids, attention_mask, decoder_input_ids, labels = _batch_tensors(
                tokenizer, next(batches), start_id, tokens["eos_token_id"])
            if model_name == T5:
                loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            else:
                logits = model.full_forward(input_ids, attention_mask, decoder_input_ids)
                loss = loss_fn(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps:
            log(f"step {step}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - started:.0f}s")

    model.eval()
    sources, targets = [s for s, _ in held_out], [t for _, t in held_out]
    if model_name == T5:
        accuracy = exact_match(_t5_predict(model, tokenizer, sources), targets)
        _save_t5(model, tokenizer, output)
    else:
        accuracy = exact_match(predict(model, tokenizer, config.special_tokens, sources, max_new_tokens=MAX_NEW_TOKENS),
                               targets)
        save_checkpoint(model, config, output, tokenizer.to_str())
    log(f"held-out exact match (greedy, {len(held_out)} instructions): {accuracy:.1%}; saved to {output}")
    return accuracy


def _t5_predict(model: nn.Module, tokenizer: Tokenizer, sources: Sequence[str]) -> list[str]:
    input_ids, attention_mask = (torch.from_numpy(a) for a in encode_sources(tokenizer, sources))
    with torch.no_grad():
        sequences = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=MAX_NEW_TOKENS,
                                   num_beams=1, do_sample=False)
    return tokenizer.decode_batch(sequences.tolist(), skip_special_tokens=True)


def _save_t5(model: nn.Module, tokenizer: Tokenizer, output: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    model.generation_config.max_new_tokens = MAX_NEW_TOKENS
    model.save_pretrained(output)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK)
    fast.save_pretrained(output)


@click.command(cls=S2SCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-o", "--output", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Directory to write the trained checkpoint into (created; files in it are replaced).")
@click.option("--model", "model_name", type=click.Choice(TRAINABLE), default="EfficientInstructionLLM",
              show_default=True,
              help="Architecture to train: a models/ class (encoder-decoder or decoder-only), or 't5' for a small "
                   "transformers T5.")
@click.option("--d-model", type=int, default=128, show_default=True,
              help="Width: d_model of the transformers, hidden_size of the LSTMs.")
@click.option("--heads", type=int, default=4, show_default=True, help="Attention heads (transformers).")
@click.option("--layers", type=int, default=2, show_default=True,
              help="Encoder layers and decoder layers, each (transformers); a decoder-only model's layers.")
@click.option("--dropout", type=float, default=0.0, show_default=True,
              help="Dropout of the transformer layers while training (the synthetic data needs none).")
@click.option("--positional-encoding", type=click.Choice(["sinusoidal", "none"]), default="sinusoidal",
              show_default=True, help="Positions for the transformers; 'none' is the plain versions' math.")
@click.option("--steps", type=click.IntRange(min=1), default=1000, show_default=True, help="Optimizer steps.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="Instructions per step.")
@click.option("--lr", type=float, default=1e-3, show_default=True, help="Peak learning rate (AdamW, cosine decay).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the weights and the training stream.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="PyTorch CPU threads (default: PyTorch's choice).")
def main(output: Path, model_name: str, d_model: int, heads: int, layers: int, dropout: float,
         positional_encoding: str, steps: int, batch_size: int, lr: float, seed: int, threads: int | None) -> None:
    """Train a seq2seq model on the built-in instruction mix (reverse:, sort:, spell out:, date:).

    Prints the loss as it goes and, at the end, the exact-match accuracy on held-out instructions.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    train(output, model_name, d_model=d_model, heads=heads, layers=layers, dropout=dropout,
          positional_encoding=positional_encoding, steps=steps, batch_size=batch_size, lr=lr, seed=seed)


if __name__ == "__main__":
    main()
