"""Text in and out: tokenize a batch (padded on the right, like transformers) and detokenize.

Uses `tokenizer.json` with the `tokenizers` package. Models with no fast tokenizer (Marian) fall
back to transformers' tokenizer, imported lazily and only then.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.errors import ExportDirError, InputItemError, first_line
from runtime.json_file import read_json_object

# transformers' `clean_up_tokenization` (tokenization_utils_base.py): applied on decode when the
# tokenizer config asks for it, so decoded text matches `tokenizer.decode` exactly.
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))

_ENCODE_CHUNK = 512  # texts per tokenizers.encode_batch call


class TextCodec:
    """Tokenizer of one export directory. Stateless after construction: safe across threads."""

    def __init__(self, export_dir: Path, tokenizer_file: str | None, pad_token_id: int):
        self.pad_token_id = pad_token_id
        config_file = export_dir / "tokenizer_config.json"
        config = read_json_object(config_file, ExportDirError, "copy it again from the original model") \
            if config_file.is_file() else {}
        self.cleanup = bool(config.get("clean_up_tokenization_spaces", False))
        self._fast: Any = None
        self._slow: Any = None
        if tokenizer_file and (export_dir / tokenizer_file).is_file():
            from tokenizers import Tokenizer

            try:
                self._fast = Tokenizer.from_file(str(export_dir / tokenizer_file))
            except Exception as err:  # noqa: BLE001 - tokenizers raises a bare Exception on a bad file
                raise ExportDirError(f"cannot read {tokenizer_file} in {str(export_dir)!r}: {err}") from None
            self._fast.no_padding()
            self._fast.no_truncation()
        else:
            self._slow = _load_transformers_tokenizer(export_dir)

    def encode(self, texts: Sequence[str], max_length: int | None = None,
               truncate: bool = False) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Tokenize texts into input_ids, attention_mask: [batch, longest] int64, padded on the right,
        and the indices of the texts that were truncated to max_length.

        Raises:
            InputItemError (an InvalidInputError): an empty text, or one longer than max_length when
                truncate is False.
        """
        ids, truncated = self.token_ids(texts, max_length, truncate)
        input_ids, attention_mask = self.pad(ids)
        return input_ids, attention_mask, truncated

    def token_ids(self, texts: Sequence[str], max_length: int | None = None,
                  truncate: bool = False) -> tuple[list[list[int]], list[int]]:
        """Tokenize texts without padding: each text's ids (special tokens included), and the indices of
        the texts that were truncated to max_length.

        Raises:
            InputItemError (an InvalidInputError): an empty text, or one longer than max_length when
                truncate is False; its `index` is the text's position in `texts`.
        """
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise InputItemError(i, "is empty; give every input some text")
        if self._fast is not None:
            # in chunks: an Encoding holds far more than its ids, and a window of them at once is tens of MB
            ids = [e.ids for start in range(0, len(texts), _ENCODE_CHUNK)
                   for e in self._fast.encode_batch(list(texts[start: start + _ENCODE_CHUNK]))]
        else:
            ids = [self._slow(text)["input_ids"] for text in texts]
        truncated = []
        if max_length is not None:
            for i, seq in enumerate(ids):
                if len(seq) > max_length:
                    if not truncate:
                        raise InputItemError(
                            i, f"has {len(seq)} tokens, more than the model's maximum of {max_length}; "
                            "shorten it, or allow truncation (--truncate / truncate=True)"
                        )
                    ids[i] = seq[: max_length - 1] + seq[-1:]  # keep the closing special token (EOS)
                    truncated.append(i)
        return ids, truncated

    def pad(self, ids: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
        """Token id lists -> input_ids, attention_mask: [batch, longest] int64, padded on the right."""
        longest = max(len(seq) for seq in ids)
        input_ids = np.full((len(ids), longest), self.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(ids), longest), dtype=np.int64)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = seq
            attention_mask[row, : len(seq)] = 1
        return input_ids, attention_mask

    def decode(self, sequences: np.ndarray, clean_up: bool = True) -> list[str]:
        """sequences: [rows, length] int64 -> texts, special tokens skipped.

        clean_up=False leaves out the tokenizer config's clean_up_tokenization_spaces (" ." -> ".", ...),
        which rewrites text already decoded: a server streaming token texts decodes without it.
        """
        rows = [list(map(int, row)) for row in sequences]
        if self._fast is not None:
            texts = self._fast.decode_batch(rows, skip_special_tokens=True)
            if self.cleanup and clean_up:
                texts = [_clean_up(t) for t in texts]
            return texts
        if not clean_up:
            return self._slow.batch_decode(rows, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return self._slow.batch_decode(rows, skip_special_tokens=True)


def _clean_up(text: str) -> str:
    for before, after in _CLEANUPS:
        text = text.replace(before, after)
    return text


def _load_transformers_tokenizer(export_dir: Path) -> Any:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ExportDirError(
            f"{str(export_dir)!r} has no tokenizer.json, and the fallback tokenizer needs transformers; "
            "`pip install transformers sentencepiece`, or pass token ids instead of text"
        ) from None
    try:
        return AutoTokenizer.from_pretrained(str(export_dir), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - transformers raises many types for a missing/bad tokenizer
        raise ExportDirError(f"cannot load a tokenizer from {str(export_dir)!r}: {first_line(err)}") from None
