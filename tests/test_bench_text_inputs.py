"""bench/text_inputs.py: the word-level tokenizer it gives an export maps "w<i>" to token i and back."""

from __future__ import annotations

import runtime
from bench.text_inputs import text_export, write_lines


def test_text_export_reads_words_as_their_token_ids(exported_dir, tmp_path):
    source = exported_dir("t5")
    tokenizer_before = (source / "tokenizer.json").read_bytes()
    model = runtime.load(text_export(source, tmp_path / "text"), provider="cpu")
    assert (source / "tokenizer.json").read_bytes() == tokenizer_before  # the source export is left as it was
    eos = model.manifest.eos_token_ids[0]
    ids, _ = model.text.token_ids(["w5 w17 w3", "w40"])
    assert ids == [[5, 17, 3, eos], [40, eos]]
    assert model.text.decode(model.text.pad([[5, 17, eos]])[0]) == ["w5 w17"]


def test_write_lines_is_seeded_and_within_the_vocabulary(tmp_path):
    first = write_lines(tmp_path / "a.txt", 300, vocab_size=50, seed=3, median_words=6, longest=20).read_text()
    again = write_lines(tmp_path / "b.txt", 300, vocab_size=50, seed=3, median_words=6, longest=20).read_text()
    assert first == again
    words = [line.split() for line in first.splitlines()]
    assert len(words) == 300 and all(1 <= len(w) <= 20 for w in words)
    assert all(3 <= int(word[1:]) < 50 for line in words for word in line)
