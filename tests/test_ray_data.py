"""runtime.batch.TextGenerator against its oracle, `Model.generate_text` of each row's text alone.

First called directly on dict and DataFrame batches (no Ray), then inside Ray Data's `map_batches`
with 2 actors on the session's local Ray (`ray_address` in conftest.py): one job per batch format
over ROWS rows, and one job in which an actor's process is killed while it holds a batch. Every
wait is bounded.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import ray
import ray.data

import runtime
from runtime.batch import TextGenerator
from runtime.errors import InvalidInputError, InvalidOptionError
from tests.fixtures.hf_models import SAMPLE_TEXTS

ROWS = 240
GREEDY = dict(max_new_tokens=8)
BEAMS = dict(num_beams=2, num_return_sequences=2, max_new_tokens=6)  # a list of 2 texts per row
KILL_TIMEOUT = 120  # seconds for the job in which an actor is killed

# Ray Data's own context warns about its own deprecated fields when it copies itself
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")


def corpus(count: int) -> list[str]:
    """`count` texts of 1 to 12 words of SAMPLE_TEXTS' vocabulary (which the tokenizers know), mostly distinct."""
    words = sorted({word.strip(".,?") for text in SAMPLE_TEXTS for word in text.split()})
    return [" ".join(words[(7 * i + 3 * k) % len(words)] for k in range(1 + i % 12)) + "." for i in range(count)]


@pytest.fixture(scope="module")
def t5_dir(exported_dir) -> Path:
    return exported_dir("t5")


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return corpus(ROWS)


@pytest.fixture(scope="module")
def expected(t5_dir, texts):
    """expected(options) -> each text's generate_text alone: a str, or a list with num_return_sequences > 1."""
    model = runtime.load(t5_dir, provider="cpu", threads=1)
    cache: dict[str, list[Any]] = {}

    def get(options: dict[str, Any]) -> list[Any]:
        key = repr(sorted(options.items()))
        if key not in cache:
            several = options.get("num_return_sequences", 1) > 1
            alone = [model.generate_text([text], **options) for text in texts]
            cache[key] = alone if several else [result[0] for result in alone]
        return cache[key]

    return get


# -- plain calls ------------------------------------------------------------------------------------------
def test_a_dict_batch_gets_each_rows_text_and_keeps_its_other_columns(t5_dir, texts, expected):
    generator = TextGenerator(t5_dir, provider="cpu", threads=1, **GREEDY)
    batch = {"id": np.arange(20, 40), "text": np.array(texts[20:40], dtype=object)}
    out = generator(batch)
    assert list(out) == ["id", "text", "generated_text"]
    assert out["generated_text"].dtype == object and out["generated_text"].shape == (20,)
    assert out["generated_text"].tolist() == expected(GREEDY)[20:40]
    np.testing.assert_array_equal(out["id"], np.arange(20, 40))
    assert "generated_text" not in batch  # the caller's dict is left as it was


def test_a_dataframe_batch_with_several_sequences_gets_a_list_per_row(t5_dir, texts, expected):
    generator = TextGenerator(t5_dir, input_column="document", output_column="summary", provider="cpu", threads=1,
                              **BEAMS)
    frame = pd.DataFrame({"document": texts[:15], "id": [f"doc-{i}" for i in range(15)]}, index=range(100, 115))
    out = generator(frame)
    assert isinstance(out, pd.DataFrame) and list(out.columns) == ["document", "id", "summary"]
    assert [list(row) for row in out["summary"]] == expected(BEAMS)[:15]
    assert out["id"].tolist() == [f"doc-{i}" for i in range(15)] and out.index.tolist() == list(range(100, 115))


def test_truncate_cuts_a_row_longer_than_the_model_takes(exported_dir):
    bart_dir = exported_dir("bart")  # BART has a position limit (T5 has none)
    model = runtime.load(bart_dir, provider="cpu", threads=1)
    long_text = " ".join(SAMPLE_TEXTS * 12)  # past the fixture's 256 positions
    batch = {"text": np.array([SAMPLE_TEXTS[1], long_text], dtype=object)}
    with pytest.warns(UserWarning, match="truncated"):
        out = TextGenerator(bart_dir, provider="cpu", threads=1, truncate=True, **GREEDY)(batch)
    with pytest.warns(UserWarning, match="truncated"):
        assert out["generated_text"].tolist() == model.generate_text(batch["text"].tolist(), truncate=True, **GREEDY)
    with pytest.raises(InvalidInputError, match=r"column 'text', row 1 of the batch .*truncate"):
        TextGenerator(bart_dir, provider="cpu", threads=1, **GREEDY)(batch)


def test_refusals_name_the_row_or_the_fix(t5_dir):
    generator = TextGenerator(t5_dir, provider="cpu", threads=1, **GREEDY)
    with pytest.raises(InvalidInputError, match=r"no column 'text' \(columns: \['id', 'body'\]\).*input_column"):
        generator({"id": np.arange(2), "body": np.array(["a", "b"], dtype=object)})
    with pytest.raises(InvalidInputError, match=r"column 'text', row 1 of the batch: expected a str, found NoneType"):
        generator({"text": np.array(["Anna reads.", None], dtype=object)})
    with pytest.raises(InvalidInputError, match=r"column 'text', row 2 of the batch is empty"):
        generator({"text": np.array(["Anna reads.", "Anna reads.", ""], dtype=object)})
    with pytest.raises(InvalidInputError, match="batch_format='numpy' or 'pandas'"):
        generator([{"text": "Anna reads."}])
    with pytest.raises(InvalidOptionError, match="num_beams"):
        TextGenerator(t5_dir, provider="cpu", num_beams=0)


def test_import_runtime_batch_imports_neither_ray_nor_torch_nor_pandas():
    probe = "import sys, runtime.batch; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                                timeout=60).stdout.split())
    assert "runtime.batch" in loaded
    assert not {"ray", "torch", "pandas", "transformers"} & loaded


# -- on Ray Data --------------------------------------------------------------------------------------------
@pytest.fixture
def ray_data(ray_address):
    """Ray Data keeping row order (its default may reorder blocks), without progress bars."""
    context = ray.data.DataContext.get_current()
    saved = context.execution_options.preserve_order, context.enable_progress_bars
    context.execution_options.preserve_order = True
    context.enable_progress_bars = False
    yield ray.data
    context.execution_options.preserve_order, context.enable_progress_bars = saved


def _dataset(data, texts: list[str]):
    return data.from_items([{"id": i, "text": text} for i, text in enumerate(texts)])


@pytest.mark.parametrize("batch_format, options", [("numpy", GREEDY), ("pandas", BEAMS)], ids=["numpy", "pandas"])
def test_map_batches_with_two_actors_equals_generate_text_row_by_row(ray_data, t5_dir, texts, expected, batch_format,
                                                                     options):
    rows = _dataset(ray_data, texts).map_batches(
        TextGenerator, fn_constructor_kwargs=dict(export_dir=str(t5_dir), provider="cpu", threads=1, **options),
        batch_size=16, batch_format=batch_format, compute=ray_data.ActorPoolStrategy(size=2)).take_all()
    assert [row["id"] for row in rows] == list(range(ROWS))
    assert [row["text"] for row in rows] == texts
    outputs = [row["generated_text"] for row in rows]
    if options.get("num_return_sequences", 1) > 1:
        outputs = [list(output) for output in outputs]
    assert outputs == expected(options)


def _generator_killed_once(marker: str) -> type:
    """A TextGenerator whose first batch, in the first actor to get one, writes its pid to `marker` and
    waits (bounded) to be killed. Defined in a function so that Ray ships the class by value."""

    class KilledOnce(TextGenerator):
        def __call__(self, batch):
            try:
                fd = os.open(marker + ".claimed", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:  # another batch was (or is being) killed: run normally
                return super().__call__(batch)
            os.close(fd)
            Path(marker + ".partial").write_text(str(os.getpid()))
            os.rename(marker + ".partial", marker)
            time.sleep(KILL_TIMEOUT)  # the test kills this process meanwhile
            return super().__call__(batch)

    return KilledOnce


def test_an_actor_killed_mid_job_is_restarted_and_every_row_appears_once(ray_data, t5_dir, texts, expected,
                                                                           tmp_path):
    marker = tmp_path / "holding-a-batch"
    killed: list[int] = []

    def kill_when_marked() -> None:
        deadline = time.monotonic() + KILL_TIMEOUT
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if marker.exists():
            pid = int(marker.read_text())
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    killer = threading.Thread(target=kill_when_marked, daemon=True)
    killer.start()
    rows = _dataset(ray_data, texts).map_batches(
        _generator_killed_once(str(marker)),
        fn_constructor_kwargs=dict(export_dir=str(t5_dir), provider="cpu", threads=1, **GREEDY),
        batch_size=16, compute=ray_data.ActorPoolStrategy(size=2)).take_all()
    killer.join(KILL_TIMEOUT)
    assert killed, "no actor got to the marked batch"
    assert [row["id"] for row in rows] == list(range(ROWS))  # each row once: the killed batch ran again elsewhere
    assert [row["generated_text"] for row in rows] == expected(GREEDY)
