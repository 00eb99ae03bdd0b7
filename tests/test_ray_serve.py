"""`s2s-serve --ray` against its oracle, `Model.generate_text`, through the real command and real clients.

One server for the module: the command in a subprocess, joining the session's local Ray (conftest's
`ray_address`) with --ray-address, 2 model replicas, Ray Serve's proxy on 127.0.0.1 at a free port.
This process, Ray's driver too, finds the replicas by their actor names to kill one. The tests run
in file order on that server and the last one ends it (SIGTERM). Every request has a timeout and
every wait a bound.
"""

from __future__ import annotations

import http.client
import json
import queue
import re
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

import pytest
import ray
import requests
from huggingface_hub import InferenceClient
from huggingface_hub.utils import reset_sessions

import runtime
from tests.fixtures.hf_models import SAMPLE_TEXTS

TIMEOUT = 30  # seconds, for any one HTTP exchange
START_TIMEOUT = 180  # seconds for the server to deploy its replicas on this busy machine
REPLICA_PREFIX = "SERVE_REPLICA::s2s#S2SGenerator#"  # Ray Serve names a replica actor app#deployment#id
LONG = dict(max_new_tokens=4000)  # seconds of work (no EOS within it for SAMPLE_TEXTS[0]): stays in flight

# pydantic 2 warns about Ray Serve's own config classes when this process unpickles a replica's handle
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.serve._private.config")


@dataclass
class RayServer:
    process: subprocess.Popen
    url: str
    port: int
    log: list[str]  # the command's stderr lines so far

    def post(self, path: str, body: Any, **kwargs) -> requests.Response:
        return requests.post(self.url + path, json=body, timeout=TIMEOUT, **kwargs)


@pytest.fixture(autouse=True)
def hub_client_online(monkeypatch):
    """As in test_serve.py: a test (or the user) may have turned HF_HUB_OFFLINE on, and a huggingface_hub
    session made then refuses every URL, loopback too; the client must reach our server."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    reset_sessions()
    yield
    reset_sessions()


@pytest.fixture(scope="module")
def t5(exported_dir) -> runtime.Model:
    return runtime.load(exported_dir("t5"), provider="cpu", threads=1)


@pytest.fixture(scope="module")
def ray_server(ray_address, exported_dir) -> Iterator[RayServer]:
    port = _free_port()
    command = [str(Path(sys.executable).parent / "s2s-serve"), str(exported_dir("t5")), "--ray", "--ray-address",
               ray_address, "--num-replicas", "2", "--threads", "1", "--provider", "cpu", "--port", str(port)]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    log: list[str] = []
    threading.Thread(target=lambda: [(lines.put(line), log.append(line)) for line in process.stderr],
                     daemon=True).start()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                assert process.poll() is None, "s2s-serve --ray exited:\n" + "".join(log[-30:])
                assert time.monotonic() < deadline, "s2s-serve --ray did not start:\n" + "".join(log[-30:])
                continue
            if re.search(rf"listening on http://127\.0\.0\.1:{port}\b", line):
                break
        yield RayServer(process, f"http://127.0.0.1:{port}", port, log)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def generator_replicas() -> list[str]:
    return sorted(actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)
                  if actor["name"].startswith(REPLICA_PREFIX))


def expected_text(model: runtime.Model, text: str, **options: Any) -> str:
    return model.generate_text([text], **options)[0]


def test_two_replicas_answer_concurrent_requests_equal_generate_text(ray_server, t5):
    assert len(generator_replicas()) == 2
    jobs = [(SAMPLE_TEXTS[i % len(SAMPLE_TEXTS)], dict(max_new_tokens=5 + 2 * i)) for i in range(8)]
    jobs += [(SAMPLE_TEXTS[i], dict(num_beams=3, max_new_tokens=8)) for i in range(2)]
    jobs += [(SAMPLE_TEXTS[i + 3], dict(do_sample=True, seed=11 + i, top_k=20, max_new_tokens=10)) for i in range(2)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda job: ray_server.post("/generate", {"inputs": job[0], "parameters": job[1]}),
                                  jobs))
    for (text, options), response in zip(jobs, responses):
        assert response.status_code == 200, response.text
        assert response.json()["generated_text"] == expected_text(t5, text, **options), (text, options)

    client = InferenceClient(ray_server.url, timeout=TIMEOUT)  # TGI's own client, streaming and not
    text = SAMPLE_TEXTS[3]
    assert client.text_generation(text, max_new_tokens=12) == expected_text(t5, text, max_new_tokens=12)
    streamed = list(client.text_generation(text, max_new_tokens=12, stream=True, details=True))
    assert streamed[-1].generated_text == expected_text(t5, text, max_new_tokens=12)
    ids = t5.generate(*t5.encode_text([text]), max_new_tokens=12)[0, 1:]
    assert [event.token.id for event in streamed] == ids.tolist()


def test_both_deployments_drain_for_as_long_as_configured(ray_server):
    """A replica told to stop answers what it holds for graceful_shutdown_timeout_s, then Ray Serve kills it:
    at Ray's default, 20 s, a longer generation in flight at SIGTERM would be cut off. Read from the running
    application's details (what `serve status` and the dashboard's REST API show)."""
    from ray.serve.context import _get_global_client  # no public call returns a deployment's config

    from serve.ray_deployment import DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S  # imports Ray Serve: within the filter

    deployments = _get_global_client().get_serve_details()["applications"]["s2s"]["deployments"]
    timeouts = {name: details["deployment_config"]["graceful_shutdown_timeout_s"]
                for name, details in deployments.items()}
    assert timeouts == {"S2SGenerator": DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S,
                        "S2SIngress": DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S}
    assert DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S >= 600  # the docstrings promise generous


def test_refusals_are_the_plain_servers_422_json(ray_server):
    """Checked by the shared validator in the ingress, and by a replica's batcher (the token budget)."""
    invalid = ray_server.post("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 0}})
    assert invalid.status_code == 422
    assert invalid.json() == {"error": "Input validation error: `max_new_tokens` must be strictly positive. Given: 0",
                              "error_type": "validation"}
    over_budget = ray_server.post("/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 40000}})
    assert over_budget.status_code == 422, over_budget.text
    assert over_budget.json()["error_type"] == "validation" and "--max-batch-tokens" in over_budget.json()["error"]


def test_a_replica_killed_mid_request_answers_500_json_and_is_replaced(ray_server, t5):
    replicas = generator_replicas()
    answer: dict[str, Any] = {}

    def long_request() -> None:
        answer["response"] = ray_server.post("/generate", {"inputs": SAMPLE_TEXTS[0], "parameters": LONG})
        answer["at"] = time.monotonic()

    in_flight = threading.Thread(target=long_request, daemon=True)
    in_flight.start()
    busy = None
    deadline = time.monotonic() + TIMEOUT
    while busy is None and time.monotonic() < deadline:
        for name in replicas:
            actor = ray.get_actor(name, namespace="serve")
            if ray.get(actor.get_num_ongoing_requests.remote(), timeout=TIMEOUT) > 0:
                busy = name, actor
                break
        time.sleep(0.05)
    assert busy is not None, "the long request never reached a replica"
    killed_at = time.monotonic()
    ray.kill(busy[1], no_restart=True)

    in_flight.join(TIMEOUT)
    assert "response" in answer, "the request in flight on the killed replica was never answered"
    assert answer["at"] - killed_at < 15  # answered on the replica's death, not when the work would have ended
    response = answer["response"]
    assert response.status_code == 500, response.text
    body = response.json()
    assert body["error_type"] == "generation"
    assert "replica" in body["error"] and "send the request again" in body["error"]

    deadline = time.monotonic() + START_TIMEOUT
    while not (len(generator_replicas()) == 2 and busy[0] not in generator_replicas()):
        assert time.monotonic() < deadline, f"the killed replica was not replaced: {generator_replicas()}"
        time.sleep(0.2)
    for text in SAMPLE_TEXTS[:4]:  # spread over both replicas, the new one among them
        response = ray_server.post("/generate", {"inputs": text, "parameters": {"max_new_tokens": 9}})
        assert response.status_code == 200 and response.json()["generated_text"] == expected_text(
            t5, text, max_new_tokens=9), response.text


def test_sigterm_finishes_the_request_in_flight_and_exits_0(ray_server):
    """The last test of the module: it ends the server."""
    conn = http.client.HTTPConnection("127.0.0.1", ray_server.port, timeout=TIMEOUT)
    conn.request("POST", "/generate_stream", json.dumps({"inputs": "hi", "parameters": {
        "max_new_tokens": 400, "min_new_tokens": 400, "details": True}}), {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.readline().startswith(b"data:")  # in flight
    ray_server.process.send_signal(signal.SIGTERM)
    events = [json.loads(line[len(b"data:"):]) for line in response.read().splitlines() if line.startswith(b"data:")]
    conn.close()
    assert events[-1]["details"]["generated_tokens"] == 400
    assert ray_server.process.wait(timeout=90) == 0, "".join(ray_server.log[-20:])
    # the cluster is left as it was found: this server started Ray Serve, so it stopped it too
    names = [actor["name"] for actor in ray.util.list_named_actors(all_namespaces=True)]
    assert not [name for name in names if name.startswith("SERVE_")], names


def test_ray_flags_need_ray_and_ray_is_imported_only_with_it(exported_dir):
    serve_command = str(Path(sys.executable).parent / "s2s-serve")
    refused = subprocess.run([serve_command, str(exported_dir("t5")), "--num-replicas", "2"], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 1 and refused.stderr.strip() == (
        "Error: --num-replicas and --ray-address apply to --ray only: add --ray")
    port_zero = subprocess.run([serve_command, str(exported_dir("t5")), "--ray", "--port", "0", "--provider", "cpu"],
                               capture_output=True, text=True, timeout=60)
    assert port_zero.returncode == 1 and len(port_zero.stderr.strip().splitlines()) == 1, port_zero.stderr
    assert "--port 0 cannot be used with --ray" in port_zero.stderr
    probe = "import sys, serve.cli; print(' '.join(sorted(sys.modules)))"
    loaded = set(subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True,
                                timeout=60).stdout.split())
    assert "ray" not in loaded
