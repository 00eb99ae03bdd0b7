"""s2s-serve against its oracle, `Model.generate_text`, through the real server and the real client.

Each test starts the real app on uvicorn, in a thread, on 127.0.0.1 and a free port, over the tiny
exported T5 of the session fixtures; the SIGTERM test runs the `s2s-serve` command in a subprocess.
Clients are huggingface_hub's InferenceClient (TGI's own client) and plain HTTP. Every request has a
timeout and every loop a bound. Batching is made deterministic where a test counts batches: a long
--max-wait-ms with --max-batch-size equal to the requests sent, so a batch starts when it is full.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np
import pytest
import requests
import uvicorn
from click.testing import CliRunner
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError as HubValidationError
from huggingface_hub.utils import reset_sessions

import runtime
from runtime.decoder import CachedDecoder
from serve.app import create_app
from serve.backend import Token
from serve.batcher import Batcher, BatchLimits
from serve.cli import main as serve_main
from serve.metrics import ServerMetrics
from serve.schema import RequestValidator, info_body
from tests.fixtures.hf_models import SAMPLE_TEXTS

TIMEOUT = 30  # seconds, for any one HTTP exchange
MAX_INPUT_TOKENS = 112
LONG = dict(max_new_tokens=4000)  # seconds of work (no EOS within it for SAMPLE_TEXTS[0]): stays in flight


@pytest.fixture(autouse=True)
def hub_client_online(monkeypatch):
    """huggingface_hub caches one requests session per thread, and one made while HF_HUB_OFFLINE was on (another
    test turns it on; a user may export it) refuses every URL, loopback too: the client must reach our server."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    reset_sessions()
    yield
    reset_sessions()


@pytest.fixture(scope="module")
def t5(exported_dir) -> runtime.Model:
    return runtime.load(exported_dir("t5"), provider="cpu", threads=1)


@dataclass
class Served:
    url: str
    port: int
    batcher: Batcher
    metrics: ServerMetrics

    def post(self, path: str, body: Any, **kwargs) -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=TIMEOUT, **kwargs)

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels or None)
        return 0.0 if value is None else value

    def wait_for_metric(self, name: str, value: float, **labels: str) -> None:
        """Metrics are recorded just after the answer leaves (the batch's, the response's): poll, bounded."""
        deadline = time.monotonic() + 20
        while self.metric(name, **labels) != value:
            assert time.monotonic() < deadline, f"{name}{labels} is {self.metric(name, **labels)}, expected {value}"
            time.sleep(0.01)


@contextlib.contextmanager
def serving(model: runtime.Model, *, max_concurrent_requests: int = 64, **limits: Any) -> Iterator[Served]:
    """The s2s-serve app over `model`, on uvicorn in a thread, listening on 127.0.0.1:<free port>."""
    limits = BatchLimits(**{"max_wait_ms": 2.0, **limits})
    metrics = ServerMetrics()
    batcher = Batcher(model, limits, metrics)
    info = info_body(model, max_input_tokens=MAX_INPUT_TOKENS, max_stop_sequences=4,
                     max_concurrent_requests=max_concurrent_requests, max_batch_size=limits.max_batch_size,
                     max_batch_tokens=limits.max_batch_tokens, max_wait_ms=limits.max_wait_ms)
    app = create_app(batcher, RequestValidator(model, MAX_INPUT_TOKENS), info,
                     max_concurrent_requests=max_concurrent_requests, metrics=metrics)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    batcher.start()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield Served(f"http://127.0.0.1:{port}", port, batcher, metrics)
    finally:
        server.should_exit = True
        thread.join(10)
        batcher.close(10)


def expected_text(model: runtime.Model, text: str, **options: Any) -> str:
    return model.generate_text([text], **options)[0]


def sse_events(response: requests.Response) -> list[dict[str, Any]]:
    return [json.loads(line[len(b"data:"):]) for line in response.iter_lines() if line.startswith(b"data:")]


# -- same answers ---------------------------------------------------------------------------------------
def test_the_client_plain_details_and_stream_equal_generate_text(t5):
    with serving(t5) as served:
        client = InferenceClient(served.url, timeout=TIMEOUT)
        for text in SAMPLE_TEXTS[:3]:
            assert client.text_generation(text, max_new_tokens=12) == expected_text(t5, text, max_new_tokens=12)

        text = SAMPLE_TEXTS[3]  # ends with EOS after 15 tokens
        ids = t5.generate(*t5.encode_text([text]), max_new_tokens=20)[0, 1:]
        out = client.text_generation(text, max_new_tokens=20, details=True)
        assert out.generated_text == expected_text(t5, text, max_new_tokens=20)
        assert [t.id for t in out.details.tokens] == ids.tolist()
        assert out.details.finish_reason == "eos_token" and out.details.tokens[-1].special
        assert out.details.generated_tokens == len(ids) and out.details.seed is None
        steps = list(t5.stream_steps(*t5.encode_text([text]), logprobs=True, max_new_tokens=20))
        np.testing.assert_allclose([t.logprob for t in out.details.tokens], [s.logprobs[0] for s in steps], rtol=1e-5)

        streamed = list(client.text_generation(text, max_new_tokens=20, stream=True, details=True))
        assert [e.token.id for e in streamed] == ids.tolist()
        assert all(e.generated_text is None and e.details is None for e in streamed[:-1])
        assert streamed[-1].generated_text == out.generated_text
        assert streamed[-1].details.finish_reason == "eos_token"
        assert streamed[-1].details.input_length == len(t5.encode_text([text])[0][0])
        assert "".join(e.token.text for e in streamed if not e.token.special) == out.generated_text
        # without details the client yields each token's text, special tokens' own strings included (as TGI's)
        assert list(client.text_generation(text, max_new_tokens=20, stream=True)) == [e.token.text for e in streamed]


@pytest.mark.parametrize("parameters", [
    dict(num_beams=3, max_new_tokens=10),
    dict(do_sample=True, seed=7, top_k=0, max_new_tokens=10),
    dict(temperature=0.7, seed=3, max_new_tokens=10),  # TGI: a sampling parameter turns sampling on
    # ... even beside do_sample: false, which TGI's own Python client always sends
    dict(do_sample=False, temperature=0.7, seed=3, max_new_tokens=10),
    dict(do_sample=False, top_k=20, seed=4, max_new_tokens=10),
    dict(do_sample=False, top_p=0.9, seed=5, max_new_tokens=10),
    dict(do_sample=False, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=10),  # each at its off value: greedy
])
def test_beam_search_and_seeded_sampling_equal_generate_text(t5, parameters):
    options = dict(parameters)
    # TGI's rule (server/text_generation_server/utils/tokens.py, NextTokenChooser): sampling = do_sample or a
    # warper changes the draw (temperature != 1, top_k != 0, top_p < 1)
    if options.get("temperature", 1.0) != 1.0 or options.get("top_k", 0) != 0 or options.get("top_p", 1.0) < 1.0:
        options["do_sample"] = True
    with serving(t5) as served:
        for text in SAMPLE_TEXTS[:2]:
            response = served.post("/generate", {"inputs": text, "parameters": {**parameters, "details": True}})
            assert response.status_code == 200, response.text
            assert response.json()["generated_text"] == expected_text(t5, text, **options)
            assert response.json()["details"]["seed"] == options.get("seed")


def test_concurrent_requests_batch_and_equal_generate_text(t5):
    """Twelve requests at once: four greedy (different lengths and limits), four seeded samples, four
    beam searches; each kind fills one batch of four; every answer is what its input alone gets."""
    jobs = [(SAMPLE_TEXTS[i], dict(max_new_tokens=6 + 3 * i)) for i in range(4)]
    jobs += [(SAMPLE_TEXTS[i + 1], dict(do_sample=True, seed=100 + i, top_k=20, max_new_tokens=12)) for i in range(4)]
    jobs += [(SAMPLE_TEXTS[i + 2], dict(num_beams=3, max_new_tokens=8)) for i in range(4)]
    with serving(t5, max_batch_size=4, max_wait_ms=5000) as served:
        with ThreadPoolExecutor(len(jobs)) as pool:
            responses = list(pool.map(lambda job: served.post("/generate", {"inputs": job[0], "parameters": job[1]}),
                                      jobs))
        served.wait_for_metric("s2s_batch_size_count", 3)
        assert served.metric("s2s_batch_size_sum") == 12
    for (text, options), response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        assert response.json()["generated_text"] == expected_text(t5, text, **options), (text, options)


def test_several_sequences_come_back_in_best_of_sequences(t5):
    text = SAMPLE_TEXTS[2]
    with serving(t5) as served:
        for options in (dict(num_beams=3, num_return_sequences=2),
                        dict(do_sample=True, seed=5, num_return_sequences=3)):
            body = served.post("/generate", {"inputs": text, "parameters": {**options, "max_new_tokens": 9,
                                                                            "details": True}}).json()
            texts = [body["generated_text"]] + [s["generated_text"] for s in body["details"]["best_of_sequences"]]
            assert texts == t5.generate_text([text], max_new_tokens=9, **options)


def test_beam_details_report_the_scores_beam_search_gave(t5):
    text, options = SAMPLE_TEXTS[1], dict(num_beams=4, max_new_tokens=10)
    with serving(t5) as served:
        response = served.post("/generate", {"inputs": text, "parameters": {**options, "details": True}})
    details = response.json()["details"]
    result = t5.generate_with_scores(*t5.encode_text([text]), **options)
    tokens = details["tokens"]
    assert [t["id"] for t in tokens] == result.sequences[0, 1: len(tokens) + 1].tolist()
    np.testing.assert_allclose(sum(t["logprob"] for t in tokens) / len(tokens), result.scores[0], rtol=1e-4)


def test_stop_sequence_ends_the_answer_where_it_appears(t5):
    text = SAMPLE_TEXTS[0]  # "... kitchen kitchen kitchen ..."
    full = expected_text(t5, text, max_new_tokens=20)
    assert "kitchen" in full
    with serving(t5) as served:
        out = InferenceClient(served.url, timeout=TIMEOUT).text_generation(text, max_new_tokens=20, stop=["kitchen"],
                                                                           details=True)
    assert out.details.finish_reason == "stop_sequence"
    assert out.generated_text.endswith("kitchen") and full.startswith(out.generated_text)
    ids = t5.generate(*t5.encode_text([text]), max_new_tokens=20)[0, 1:]
    assert [t.id for t in out.details.tokens] == ids[: len(out.details.tokens)].tolist()


def test_request_flags_truncate_full_text_and_prefill(t5):
    text = " ".join(SAMPLE_TEXTS)  # longer than MAX_INPUT_TOKENS
    ids, _ = t5.encode_text([text])
    assert ids.shape[1] > MAX_INPUT_TOKENS
    truncated = np.concatenate([ids[:, : MAX_INPUT_TOKENS - 1], ids[:, -1:]], axis=1)
    with serving(t5) as served:
        body = served.post("/generate", {"inputs": text, "parameters": {"truncate": MAX_INPUT_TOKENS,
                                                                        "max_new_tokens": 8}}).json()
        assert body["generated_text"] == t5.text.decode(t5.generate(truncated, max_new_tokens=8))[0]
        short = SAMPLE_TEXTS[1]
        body = served.post("/generate", {"inputs": short, "parameters": {
            "return_full_text": True, "decoder_input_details": True, "details": True, "max_new_tokens": 5}}).json()
        assert body["generated_text"] == short + expected_text(t5, short, max_new_tokens=5)
        assert body["details"]["prefill"] == [{"id": t5.manifest.decoder_start_token_id, "text": "<pad>",
                                               "logprob": None}]
        compat = served.post("/", {"inputs": short, "parameters": {"max_new_tokens": 5}})
        assert compat.json() == [{"generated_text": expected_text(t5, short, max_new_tokens=5)}]


# -- errors, back-pressure, faults ------------------------------------------------------------------------
BAD_REQUESTS = [
    ({"parameters": {}}, "`inputs` must be a string"),
    ({"inputs": ""}, "`inputs` cannot be empty"),
    ({"inputs": "  "}, "`inputs` cannot be empty"),
    ({"inputs": 5}, "`inputs` must be a string"),
    ([1, 2], "expected a JSON object"),
    ({"inputs": "hi", "extra": 1}, "unknown field"),
    ({"inputs": "hi", "parameters": []}, "`parameters` must be an object"),
    ({"inputs": "hi", "parameters": {"max_new_tokens": "5"}}, "`max_new_tokens` must be an integer"),
    ({"inputs": "hi", "parameters": {"max_new_tokens": 5.0}}, "`max_new_tokens` must be an integer"),
    ({"inputs": "hi", "parameters": {"max_new_tokens": 0}}, "`max_new_tokens` must be strictly positive"),
    ({"inputs": "hi", "parameters": {"temperature": 0}}, "`temperature` must be strictly positive"),
    ({"inputs": "hi", "parameters": {"top_p": 1.5}}, "`top_p` must be > 0.0 and <= 1.0"),
    ({"inputs": "hi", "parameters": {"top_k": -1}}, "`top_k` must be >= 0"),
    ({"inputs": "hi", "parameters": {"repetition_penalty": -1.0}}, "`repetition_penalty` must be strictly positive"),
    ({"inputs": "hi", "parameters": {"seed": -3}}, "`seed` must be >= 0"),
    ({"inputs": "hi", "parameters": {"details": "yes"}}, "`details` must be true or false"),
    ({"inputs": "hi", "parameters": {"stop": "x"}}, "`stop` must be a list"),
    ({"inputs": "hi", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}, "up to 4 stop sequences"),
    ({"inputs": "hi", "parameters": {"num_beams": 0}}, "num_beams=0"),
    ({"inputs": "hi", "parameters": {"num_beams": 2, "num_return_sequences": 3, "details": True}},
     "num_return_sequences"),
    ({"inputs": "hi", "parameters": {"num_return_sequences": 2, "num_beams": 2}}, "needs `details: true`"),
    ({"inputs": "hi", "parameters": {"num_beams": 2, "stop": ["a"]}}, "beam search cannot end"),
    ({"inputs": "hi", "parameters": {"truncate": 0}}, "`truncate` must be strictly positive"),
    ({"inputs": "hi", "parameters": {"truncate": MAX_INPUT_TOKENS + 1}}, "`truncate` must be strictly positive"),
    ({"inputs": " ".join(SAMPLE_TEXTS)}, f"`inputs` must have at most {MAX_INPUT_TOKENS} tokens"),
    ({"inputs": "hi", "parameters": {"watermark": True}}, "`watermark` is not supported"),
    ({"inputs": "hi", "parameters": {"best_of": 2}}, "`best_of` must be > 0 and <= 1"),
    ({"inputs": "hi", "parameters": {"top_n_tokens": 3}}, "`top_n_tokens` must be >= 0 and <= 0"),
    ({"inputs": "hi", "parameters": {"grammar": {"type": "regex", "value": "a+"}}}, "`grammar` is not supported"),
    ({"inputs": "hi", "parameters": {"typical_p": 0.5}}, "`typical_p` is not supported"),
    ({"inputs": "hi", "parameters": {"max_length": 5}}, "unknown parameter"),
    ({"inputs": "hi", "stream": True}, "contradicts this route"),
]


def test_each_invalid_request_is_a_422_and_the_server_keeps_serving(t5):
    with serving(t5) as served:
        for body, message in BAD_REQUESTS:
            response = served.post("/generate", body)
            assert response.status_code == 422, (body, response.text)
            assert response.json()["error_type"] == "validation" and message in response.json()["error"], \
                (body, response.json())
        response = requests.post(served.url + "/generate", data=b"{not json", timeout=TIMEOUT)
        assert response.status_code == 400 and response.json()["error_type"] == "validation"
        for parameters, message in [({"num_beams": 2}, "cannot stream"),
                                    ({"decoder_input_details": True}, "decoder_input_details")]:
            body = {"inputs": "hi", "parameters": parameters}
            response = served.post("/generate_stream", body)
            assert response.status_code == 422 and message in response.json()["error"], response.text
        with pytest.raises(HubValidationError, match="strictly positive"):  # the client names TGI's error type
            InferenceClient(served.url, timeout=TIMEOUT).text_generation("hi", max_new_tokens=0)

        assert requests.get(served.url + "/nope", timeout=TIMEOUT).status_code == 404
        assert requests.get(served.url + "/nope", timeout=TIMEOUT).json()["error_type"] == "not_found"
        assert requests.get(served.url + "/generate", timeout=TIMEOUT).status_code == 405
        text = SAMPLE_TEXTS[0]
        assert served.post("/generate", {"inputs": text}).json()["generated_text"] == expected_text(t5, text)
        served.wait_for_metric("s2s_requests_total", len(BAD_REQUESTS) + 3, status="422")


def test_health_info_and_metrics(t5):
    with serving(t5) as served:
        assert requests.get(served.url + "/health", timeout=TIMEOUT).status_code == 200
        info = requests.get(served.url + "/info", timeout=TIMEOUT).json()
        assert info["model_type"] == "t5" and info["max_input_tokens"] == MAX_INPUT_TOKENS
        assert info["model_device_type"] == "cpu" and info["versions"]["s2s"]
        served.post("/generate", {"inputs": SAMPLE_TEXTS[0], "parameters": {"max_new_tokens": 7}})
        served.wait_for_metric("s2s_batch_size_count", 1)
        text = requests.get(served.url + "/metrics", timeout=TIMEOUT).text
        for line in ('s2s_requests_total{status="200"}', "s2s_generated_tokens_total 7.0", "s2s_queue_size 0.0",
                     "s2s_batch_size_count 1.0", "s2s_request_duration_seconds_count 1.0"):
            assert line in text, line


def _start_request(served: Served, path: str, parameters: dict[str, Any],
                   text: str = SAMPLE_TEXTS[0]) -> http.client.HTTPConnection:
    """Send a request and leave its answer unread: closing the connection is the client leaving."""
    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=TIMEOUT)
    conn.request("POST", path, json.dumps({"inputs": text, "parameters": parameters}),
                 {"Content-Type": "application/json"})
    return conn


def _start_stream(served: Served, parameters: dict[str, Any],
                  text: str = SAMPLE_TEXTS[0]) -> http.client.HTTPConnection:
    return _start_request(served, "/generate_stream", parameters, text)


def _count_steps(model: runtime.Model, monkeypatch) -> list[Any]:
    """The steps the model's batches run from now on (Model.stream_steps wrapped)."""
    steps_run: list[Any] = []
    real = model.stream_steps

    def counting(*args, **kwargs):
        for step in real(*args, **kwargs):
            steps_run.append(step)
            yield step

    monkeypatch.setattr(model, "stream_steps", counting)
    return steps_run


def _wait_until(condition, what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def _first_token(conn: http.client.HTTPConnection) -> http.client.HTTPConnection:
    """Wait for a stream's first event: from then on its request is surely generating."""
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data:")
    return conn


def test_429_at_once_beyond_max_concurrent_requests(t5):
    # both long streams in one batch (it starts once full), so both are generating at once
    with serving(t5, max_concurrent_requests=2, max_batch_size=2, max_wait_ms=1500) as served:
        streams = [_first_token(conn) for conn in [_start_stream(served, LONG) for _ in range(2)]]
        started = time.monotonic()
        response = served.post("/generate", {"inputs": "hi"})
        assert response.status_code == 429 and time.monotonic() - started < 5
        assert response.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
        for conn in streams:
            conn.close()
        deadline = time.monotonic() + 20  # both disconnected: their permits come back
        while served.post("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 2}}).status_code == 429:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_client_disconnect_mid_stream_stops_its_row(t5, monkeypatch):
    steps_run = _count_steps(t5, monkeypatch)
    other = SAMPLE_TEXTS[2]
    with serving(t5, max_batch_size=2, max_wait_ms=1500) as served:
        with ThreadPoolExecutor(1) as pool:  # a short request in the same batch as the abandoned one
            short = pool.submit(served.post, "/generate", {"inputs": other, "parameters": {"max_new_tokens": 30}})
            _first_token(_start_stream(served, LONG)).close()
            assert short.result().json()["generated_text"] == expected_text(t5, other, max_new_tokens=30)
        served.wait_for_metric("s2s_batch_size_count", 1)
        assert len(steps_run) < 200  # the batch ended soon after the short row, not after 4000 steps
        assert served.post("/generate", {"inputs": other, "parameters": {"max_new_tokens": 3}}).status_code == 200
        assert served.metric("s2s_queue_size") == 0


def test_client_leaving_a_generate_stops_its_row_and_is_logged_499(t5, monkeypatch, caplog):
    """The /generate twin of the stream test above: the request is cancelled, counted and logged as 499
    (nobody reads it), with no traceback, and its row leaves the batch."""
    steps_run = _count_steps(t5, monkeypatch)
    other = SAMPLE_TEXTS[2]
    with serving(t5, max_batch_size=2, max_wait_ms=60_000) as served:  # the batch starts once both are queued
        with ThreadPoolExecutor(1) as pool:
            short = pool.submit(served.post, "/generate", {"inputs": other, "parameters": {"max_new_tokens": 30}})
            abandoned = _start_request(served, "/generate", LONG)
            _wait_until(lambda: steps_run, "the batch never started")
            abandoned.close()
            assert short.result().json()["generated_text"] == expected_text(t5, other, max_new_tokens=30)
        served.wait_for_metric("s2s_requests_total", 1, status="499")
        assert len(steps_run) < 200  # the batch ended soon after the short row, not after 4000 steps
        assert served.metric("s2s_requests_total", status="500") == 0
    assert not [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]


@pytest.mark.parametrize("path", ["/generate", "/generate_stream"])
def test_a_queued_request_whose_client_left_leaves_the_queue(t5, path):
    """Alone in the queue (a batch of 2 starts when full), the request waits; its client leaves before any
    token: it leaves the queue and its count at once, and never takes a row of the next batch."""
    with serving(t5, max_batch_size=2, max_wait_ms=60_000) as served:
        abandoned = _start_request(served, path, {"max_new_tokens": 5})
        served.wait_for_metric("s2s_queue_size", 1)
        abandoned.close()
        served.wait_for_metric("s2s_queue_size", 0)
        served.wait_for_metric("s2s_requests_total", 1, status="499")
        jobs = [(SAMPLE_TEXTS[1], dict(max_new_tokens=6)), (SAMPLE_TEXTS[3], dict(max_new_tokens=8))]
        with ThreadPoolExecutor(len(jobs)) as pool:
            responses = list(pool.map(lambda job: served.post("/generate", {"inputs": job[0], "parameters": job[1]}),
                                      jobs))
        for (text, options), response in zip(jobs, responses):
            assert response.json()["generated_text"] == expected_text(t5, text, **options)
        served.wait_for_metric("s2s_batch_size_count", 1)
        assert served.metric("s2s_batch_size_sum") == 2  # the two, without the abandoned one


def test_max_batch_tokens_splits_compatible_requests(t5):
    """Compatible greedy requests beyond the padded-token budget go to the next batch, and a batch that left
    one out starts at once instead of waiting --max-wait-ms for company. Sent one at a time, each once the
    queue shows the one before, so the batches are known: [A, C] (B left out), then [B, D, E]."""
    short, long = SAMPLE_TEXTS[1], SAMPLE_TEXTS[2]
    s, big = (len(t5.encode_text([text])[0][0]) for text in (short, long))
    few, many = 2, 12  # new tokens of the long and of the short requests
    budget = 3 * (big + few)  # [B, D, E] fits; [A, C] too (2 x (s + many)); [A, C, B] (3 x (big + many)) not
    assert 2 * (s + many) <= budget < 3 * (big + many)
    small_job, big_job = (short, dict(max_new_tokens=many)), (long, dict(max_new_tokens=few))
    with serving(t5, max_batch_size=3, max_batch_tokens=budget, max_wait_ms=60_000) as served:
        with ThreadPoolExecutor(5) as pool:
            sent = []
            for job, queued_after in [(small_job, 1), (small_job, 2), (big_job, 1), (big_job, 2), (big_job, None)]:
                sent.append((job, pool.submit(served.post, "/generate", {"inputs": job[0], "parameters": job[1]})))
                if queued_after is not None:
                    served.wait_for_metric("s2s_queue_size", queued_after)
            for (text, options), response in sent:
                assert response.result().json()["generated_text"] == expected_text(t5, text, **options)
        served.wait_for_metric("s2s_batch_size_count", 2)
        assert served.metric("s2s_batch_size_sum") == 5
        assert served.metric("s2s_batch_size_bucket", le="2.0") == 1  # [A, C]; then [B, D, E]


def _script_decoder(monkeypatch, script: list[int]) -> None:
    """Make every decoder call favour script[t] at its step t (a bonus of 1000 to that logit), so that the
    tiny random model says the script: Model.generate_text and the server run through the same decoder.
    Greedy's pinned steps, which read the logits without `__call__`, are turned off."""
    real = CachedDecoder.__call__

    def scripted(self, input_ids):
        logits = real(self, input_ids)
        step = self.__dict__.setdefault("scripted_steps", 0)
        self.scripted_steps = step + 1
        if step < len(script):
            logits[:, script[step]] += 1000.0
        return logits

    monkeypatch.setattr(CachedDecoder, "__call__", scripted)
    monkeypatch.setattr(CachedDecoder, "pinned", lambda self: None)


def test_streamed_texts_survive_the_tokenizers_clean_up(exported_dir, tmp_path, monkeypatch):
    """With clean_up_tokenization_spaces (BART's and others' tokenizer_config), decoding more tokens rewrites
    text a stream already sent (" n't" -> "n't", " ." -> "."). The token texts join to the text decoded
    without the clean-up; generated_text is Model.generate_text's, clean-up included."""
    export = tmp_path / "t5-cleanup"
    shutil.copytree(exported_dir("t5"), export)
    config_file = export / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "clean_up_tokenization_spaces": True}))
    model = runtime.load(export, provider="cpu", threads=1)
    assert model.text.cleanup
    _script_decoder(monkeypatch, model.text.encode(["Anna does n't read . Where is the cat ?"])[0][0].tolist())
    text, options = SAMPLE_TEXTS[1], dict(max_new_tokens=40)
    generated = expected_text(model, text, **options)
    before_clean_up = model.text.decode(model.generate(*model.encode_text([text]), **options), clean_up=False)[0]
    assert generated == "Anna doesn't read. Where is the cat?" and before_clean_up != generated
    with serving(model) as served:
        client = InferenceClient(served.url, timeout=TIMEOUT)
        streamed = list(client.text_generation(text, stream=True, details=True, **options))
        assert "".join(event.token.text for event in streamed if not event.token.special) == before_clean_up
        assert streamed[-1].generated_text == generated and streamed[-1].details.finish_reason == "eos_token"
        assert client.text_generation(text, **options) == generated


def test_a_failing_generation_answers_500_and_the_server_keeps_serving(t5, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("decoder exploded")

    with serving(t5) as served:
        monkeypatch.setattr(t5, "stream_steps", broken)
        for path in ("/generate", "/generate_stream"):
            response = served.post(path, {"inputs": "hi"})
            assert response.status_code == 500
            assert response.json() == {"error": "Request failed during generation: RuntimeError: decoder exploded",
                                       "error_type": "generation"}
        monkeypatch.undo()
        text = SAMPLE_TEXTS[1]
        response = served.post("/generate", {"inputs": text, "parameters": {"max_new_tokens": 6}})
        assert response.json()["generated_text"] == expected_text(t5, text, max_new_tokens=6)


def test_a_failure_mid_stream_ends_the_stream_with_an_error_event(t5, monkeypatch):
    real = t5.stream_steps

    def fails_after_two(*args, **kwargs):
        for number, step in enumerate(real(*args, **kwargs)):
            if number == 2:
                raise RuntimeError("lost the device")
            yield step

    with serving(t5) as served:
        monkeypatch.setattr(t5, "stream_steps", fails_after_two)
        events = sse_events(served.post("/generate_stream", {"inputs": "hi"}, stream=True))
    assert [e.get("error_type") for e in events] == [None, None, "generation"]


def test_an_unexpected_error_is_a_json_500_and_the_server_keeps_serving(t5, monkeypatch):
    """A bug or a backend's own exception (not a ServeError) is still TGI's JSON error, never Starlette's
    text/plain "Internal Server Error"; mid-stream it ends the stream with an error event."""
    async def broken_generate(request):
        raise RuntimeError("a bug")

    async def broken_stream(request):
        raise RuntimeError("a bug")
        yield  # an async generator, as a backend's generate_stream is

    async def broken_mid_stream(request):
        yield Token(id=5, text="x", logprob=None, special=False)
        raise RuntimeError("a bug")

    expected = {"error": "Request failed during generation: RuntimeError: a bug", "error_type": "generation"}
    with serving(t5) as served:
        monkeypatch.setattr(served.batcher, "generate", broken_generate)
        monkeypatch.setattr(served.batcher, "generate_stream", broken_stream)
        for path, body in [("/generate", {"inputs": "hi"}), ("/generate_stream", {"inputs": "hi"}),
                           ("/", {"inputs": "hi", "stream": False}), ("/", {"inputs": "hi", "stream": True})]:
            response = served.post(path, body)
            assert response.status_code == 500 and response.headers["content-type"] == "application/json", path
            assert response.json() == expected, path
        monkeypatch.setattr(served.batcher, "generate_stream", broken_mid_stream)
        events = sse_events(served.post("/generate_stream", {"inputs": "hi"}, stream=True))
        assert events[0]["token"]["text"] == "x" and events[1:] == [expected]
        monkeypatch.undo()
        text = SAMPLE_TEXTS[1]
        response = served.post("/generate", {"inputs": text, "parameters": {"max_new_tokens": 6}})
        assert response.json()["generated_text"] == expected_text(t5, text, max_new_tokens=6)
        served.wait_for_metric("s2s_requests_total", 4, status="500")


# -- shutdown ---------------------------------------------------------------------------------------------
def test_sigterm_finishes_the_request_in_flight_and_exits_0(exported_dir):
    command = [str(Path(sys.executable).parent / "s2s-serve"), str(exported_dir("t5")), "--port", "0",
               "--threads", "1", "--provider", "cpu"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr], daemon=True).start()
    try:
        port = None
        deadline = time.monotonic() + 60
        while port is None:
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", lines.get(timeout=deadline - time.monotonic()))
            port = int(found.group(1)) if found else None
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT)
        conn.request("POST", "/generate_stream", json.dumps({"inputs": "hi", "parameters": {
            "max_new_tokens": 1500, "min_new_tokens": 1500, "details": True}}), {"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.readline().startswith(b"data:")  # in flight
        process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(OSError):  # no longer accepting connections
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        events = [json.loads(line[len(b"data:"):]) for line in response.read().splitlines()
                  if line.startswith(b"data:")]
        conn.close()
        assert events[-1]["details"]["generated_tokens"] == 1500
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
        process.stderr.close()


def test_cli_errors_are_one_line(exported_dir, tmp_path):
    serve = str(Path(sys.executable).parent / "s2s-serve")
    missing = subprocess.run([serve, str(tmp_path / "missing")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1
    assert missing.stderr.startswith("Error: ") and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = subprocess.run([serve, str(exported_dir("t5")), "--provider", "cpu", "--port",
                               str(taken.getsockname()[1])], capture_output=True, text=True, timeout=60)
    assert busy.returncode == 1 and "Error: cannot listen on 127.0.0.1:" in busy.stderr, busy.stderr
    assert "Traceback" not in busy.stderr


def test_every_flag_has_help():
    result = CliRunner().invoke(serve_main, ["--help"])
    assert result.exit_code == 0, result.output
    options = [param for param in serve_main.params if isinstance(param, click.Option)]
    assert [option.name for option in options if not option.help] == []
    assert "onnxruntime execution provider" in result.output


def test_without_the_serve_extra_the_command_says_what_to_install(exported_dir):
    """uvicorn made unimportable, as where s2s is installed without [serve]: one line, exit 1."""
    probe = "import sys; sys.modules['uvicorn'] = None; from serve.cli import main; main()"
    result = subprocess.run([sys.executable, "-c", probe, str(exported_dir("t5")), "--provider", "cpu"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines() == [
        "Error: s2s-serve needs uvicorn, from its [serve] extra, which is not installed: pip install 's2s[serve]'"]


def test_the_runtime_imports_no_web_framework_and_the_server_no_torch():
    def modules_after(code: str) -> set[str]:
        probe = f"import sys\n{code}\nprint('\\n'.join(sorted(sys.modules)))"
        return set(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                                  timeout=60).stdout.split())

    assert not {"starlette", "uvicorn", "prometheus_client", "serve"} & modules_after("import runtime")
    assert not {"torch", "transformers"} & modules_after("import serve.cli, serve.app, serve.batcher, serve.schema")
