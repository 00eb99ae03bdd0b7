"""Text for s2s-run benchmarks: a text-reading copy of a bench export, seeded input files, measured runs.

The bench's shapes are random-weight models without a tokenizer, and s2s-run reads text. `text_export`
gives an export a word-level tokenizer over its whole vocabulary (token i is the word "w<i>", pad
and EOS are "<pad>" and "</s>", and every line ends in EOS, as a real tokenizer's output does), its
graphs linked, not copied.
`write_lines` writes seeded lines of such words, their lengths spread like sentences. `run_s2s_run`
runs s2s-run in a fresh process and reports its peak resident memory (that process alone, from
wait4, by an intermediate process) and the rates of its summary line.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.sources import REPO_ROOT
from runtime.manifest import MANIFEST_NAME, Manifest

TOKENIZER = "tokenizer.json"


def prepared_text_export(model: str, precision: str, cache_dir: Path, export_dir: Path | None = None) -> Path:
    """The text-reading copy of `export_dir`, or of the s2s export of `model` (a bench shape name or a
    checkpoint directory) at `precision`, exported on first use the way s2s-bench does."""
    if export_dir is None:
        from bench.engines import s2s
        from bench.sources import resolve

        export_dir = s2s.prepare(resolve(model, cache_dir), precision, "cpu", cache_dir)
    return text_export(export_dir, cache_dir / "artefacts" / "s2s-text" / export_dir.resolve().name)


def text_export(export_dir: Path, target: Path) -> Path:
    """`target`: export_dir's graphs and configs (symlinks) with a word-level tokenizer.json (built once)."""
    manifest = Manifest.read(export_dir)
    if (target / MANIFEST_NAME).is_file():
        return target
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    target.mkdir(parents=True, exist_ok=True)
    for path in export_dir.iterdir():  # not the files written below: saving through a link would overwrite the source's
        if path.name not in (MANIFEST_NAME, TOKENIZER) and not (target / path.name).exists():
            (target / path.name).symlink_to(path.resolve())
    eos, pad = manifest.eos_token_ids[0], manifest.pad_token_id
    # the special ids get only their special names (one name per id), so decoding skips them
    vocab = {f"w{i}": i for i in range(manifest.vocab_size) if i not in (eos, pad)}
    vocab.update({"<pad>": pad, "</s>": eos})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    tokenizer.add_special_tokens(["<pad>", "</s>"])
    tokenizer.save(str(target / TOKENIZER))
    data = json.loads((export_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    data["tokenizer_file"] = TOKENIZER
    (target / MANIFEST_NAME).write_text(json.dumps(data, indent=2), encoding="utf-8")  # written last: marks it done
    return target


def write_lines(path: Path, count: int, vocab_size: int, seed: int = 0, median_words: float = 20.0,
                longest: int = 200) -> Path:
    """`count` lines of random words "w<i>" (ids 3 and up), lengths log-normal around `median_words`
    (sigma 0.6: a tenth of the lines under half the median, a tenth over twice it), at most `longest`."""
    rng = np.random.default_rng(seed)
    with path.open("w", encoding="utf-8") as out:
        for start in range(0, count, 10_000):  # a block at a time: the writer's memory stays small too
            n = min(10_000, count - start)
            lengths = np.clip(np.rint(rng.lognormal(np.log(median_words), 0.6, n)), 1, longest).astype(int)
            for length in lengths:
                out.write(" ".join(f"w{i}" for i in rng.integers(3, vocab_size, length)) + "\n")
    return path


@dataclass(frozen=True)
class RunResult:
    wall_s: float  # the whole process: start, model load, generation, exit
    peak_rss_mib: float  # that process's peak resident memory
    lines_per_s: float  # from s2s-run's summary line: generation only
    tokens_per_s: float


_SUMMARY = re.compile(r"([\d.]+) lines/s, ([\d.]+) generated tokens/s")


# Run by a small intermediate Python process: a child's ru_maxrss starts at its parent's resident size
# (Linux keeps the high-water mark across fork and exec), and this parent may hold torch from exporting.
_RUNNER = """
import os, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(child.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def run_s2s_run(args: list[str]) -> RunResult:
    """Run `s2s-run ARGS` in a fresh process (stdout discarded); raise RuntimeError if it fails."""
    command = [sys.executable, "-c", _RUNNER, sys.executable, "-c", "from runtime.cli import main; main()", *args]
    started = time.perf_counter()
    finished = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    match = _SUMMARY.search(finished.stderr)
    returncode, max_rss_kb = (int(n) for n in finished.stdout.split()) if finished.returncode == 0 else (-1, 0)
    if returncode != 0 or match is None:
        raise RuntimeError(f"s2s-run {' '.join(args)} failed ({returncode}): {finished.stderr.strip()[-2000:]}")
    return RunResult(wall, max_rss_kb / 1024, float(match.group(1)), float(match.group(2)))
