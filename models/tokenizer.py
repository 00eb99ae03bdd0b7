"""A BPE tokenizer trained on the instruction mix (the `tokenizers` package; saved as tokenizer.json).

Spaces become "▁" (Metaspace, so decoding restores the text exactly); punctuation and every digit are
tokens of their own, so numbers and dates are read digit by digit (an unseen number needs no unseen
token) and "twenty-one" shares its pieces with "twenty" and "one". Encoding an
input appends EOS (the post-processor), the way T5's tokenizer does; answers are encoded without it.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3


def train_tokenizer(texts: Iterable[str], vocab_size: int = 320) -> Tokenizer:
    """Train on `texts`; ids 0..3 are <pad>, <s> (decoder start), </s> (EOS), <unk>."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation(),
                                                       pre_tokenizers.Digits(individual_digits=True)])
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", special_tokens=[(EOS, tokenizer.token_to_id(EOS))])
    return tokenizer


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """The ids a checkpoint's "special_tokens" and a manifest need."""
    return {"pad_token_id": tokenizer.token_to_id(PAD), "decoder_start_token_id": tokenizer.token_to_id(BOS),
            "eos_token_id": tokenizer.token_to_id(EOS)}
