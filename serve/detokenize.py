"""Token text as tokens arrive: what each token adds to a row's text, and whether it is special.

A token's text is the difference between the row's text decoded with and without it (decoding one
token alone loses the spaces SentencePiece and byte-level BPE put in neighbouring tokens), held back
while the text ends in an incomplete UTF-8 character. Special tokens (EOS, pad) add nothing to the
text and carry their own string ("</s>"), as TGI's tokens do.

The rule: the texts of a row's non-special tokens join to the row's text decoded without the
tokenizer's clean-up (`TextCodec.decode(..., clean_up=False)`), and the final `generated_text` is
decoded whole, clean-up included, exactly as `Model.generate_text` decodes it. The two differ only by
that clean-up (`clean_up_tokenization_spaces`: " n't" -> "n't", " ." -> ".", ...), which is why the
token texts leave it out: it rewrites text already sent, so a stream with it would stop at the first
rewrite. Two exceptions: a text that ends in an incomplete character, whose last bytes no token text
carries; and a decoder that rewrites earlier text by itself, where the token texts wait until the text
extends what they sent.
"""

from __future__ import annotations

import numpy as np

from runtime import Model


class TokenTexts:
    """Decoding helpers for one export's tokenizer (read-only: shared by every row and thread)."""

    def __init__(self, model: Model):
        self._codec = model.text
        manifest = model.manifest
        self.decoder_start_token_id = manifest.decoder_start_token_id
        # The manifest names the special tokens generation emits; tokenizer.json adds the others with their text.
        self.special: dict[int, str] = {i: "" for i in (*manifest.eos_token_ids, manifest.pad_token_id,
                                                       manifest.decoder_start_token_id)}
        if manifest.tokenizer_file and (model.export_dir / manifest.tokenizer_file).is_file():
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(model.export_dir / manifest.tokenizer_file))
            for token_id, added in tokenizer.get_added_tokens_decoder().items():
                if added.special or token_id in self.special:
                    self.special[token_id] = added.content

    def decode(self, generated_ids: list[int], clean_up: bool = True) -> str:
        """The text of generated ids (start token excluded), decoded as Model.generate_text decodes;
        clean_up=False: without the tokenizer's clean_up_tokenization_spaces (see the module docstring)."""
        sequence = np.asarray([[self.decoder_start_token_id, *generated_ids]], dtype=np.int64)
        return self._codec.decode(sequence, clean_up=clean_up)[0]


class RowText:
    """One row's text as its tokens arrive."""

    def __init__(self, texts: TokenTexts):
        self._texts = texts
        self._ids: list[int] = []
        self.text = ""  # decoded text of every token so far, without the clean-up
        self._emitted = ""  # what the token texts handed out so far add up to

    def push(self, token_id: int) -> str:
        """Add a token; return the text it adds (its own string for a special token)."""
        special = self._texts.special.get(token_id)
        if special is not None:
            return special
        self._ids.append(token_id)
        self.text = self._texts.decode(self._ids, clean_up=False)
        if self.text.endswith("\ufffd") or not self.text.startswith(self._emitted):
            return ""  # an incomplete character, or the decoder rewrote earlier text: wait for more
        added = self.text[len(self._emitted):]
        self._emitted = self.text
        return added
