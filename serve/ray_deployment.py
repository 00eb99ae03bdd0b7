"""s2s-serve on Ray Serve: TGI's HTTP API (serve/app.py) in front of N model replicas.

    from ray import serve
    from serve.ray_deployment import build_app

    serve.run(build_app("out/t5", num_replicas=4, threads=2), name="s2s", route_prefix="/")

`build_app` binds two deployments; `s2s-serve EXPORT --ray` runs what it returns (serve/ray_cli.py).

- `S2SGenerator`, N replicas: each loads the model and runs the project's dynamic batcher
  (`serve.batcher.Batcher`, a worker thread) over the requests routed to it. Its methods are the
  `serve.backend.GenerationBackend` calls over validated requests: `generate(request)` and
  `generate_stream(request)` (`request` a `serve.schema.GenerateRequest`).
- `S2SIngress`, one replica: the very app plain s2s-serve runs (`serve.app.create_app`: parsing,
  validation, response formatting, 429 back-pressure, SSE, metrics) with `RayBackend` as its backend,
  which sends each request through a DeploymentHandle to the least busy generator replica. It loads
  the export too (CPU, one thread), for what the validator reads: tokenizer, generation defaults, limits.

Two deployments, not one app per replica, because a replica that dies mid-request cannot answer for
itself: Ray Serve's proxy would give the client a plain-text 500. Here the ingress sees the
generator replica die and answers TGI's JSON `{"error": ..., "error_type": "generation"}` (500) at
once; Ray Serve starts a replacement replica meanwhile. (If the ingress itself dies, the proxy's
plain 500 is what a client gets.)

Batching inside each replica is the project's `Batcher`, not Ray Serve's `@serve.batch`, by
measurement and by function. Measured with `python -m bench.ray_serve_batching --rounds 3` (one
replica, 2 threads, t5-small shape fp32, 32 requests of 21 tokens, 32 new tokens each, 16 clients,
both at max batch 32 and 5 ms wait; medians of 3 interleaved rounds on the shared 2-core machine):
greedy 6.25 requests/s with the Batcher against 5.22 with `@serve.batch` (p50 latency 2.4 s against
2.9 s); half greedy, half beam search 2.82 against 2.46 (p50 4.4 s against 6.0 s), `@serve.batch`
running a batch's two kinds one after the other. And the Batcher groups requests by what must match
to share a generate call (its batch key), bounds a batch's padded tokens, streams token by token and
drops a request whose client left; `@serve.batch` does none of these.

Composing your own Serve app: `S2SGenerator` is an ordinary deployment. Bind it into your own
ingress and call it with requests your `serve.schema.RequestValidator` validated:

    generator = S2SGenerator.options(
        num_replicas=2, ray_actor_options={"num_cpus": 2},
        max_ongoing_requests=64,  # Ray Serve's default, 5, would cap each replica's batches at 5 requests
    ).bind("/models/t5", threads=2)
    ...
    result = await generator_handle.generate.remote(validator.validate(body, stream=False))
    text = result.sequences[0].text

or run `build_app(...)` as one application among yours under its own `route_prefix`. The export
directory must be readable at the same path on every node that runs a replica (shared storage, or
copied there), and s2s installed in the nodes' Python (or shipped in a `runtime_env`).

Shutdown: a replica told to stop (`serve.delete`, so SIGTERM of `s2s-serve --ray`; a scale-down)
answers the requests it holds before it exits, for up to `graceful_shutdown_timeout_s`, after which
Ray Serve kills it. Ray Serve's default, 20 s, would cut off any generation longer than that; both
deployments here get `DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S`, an hour, instead (a build_app argument;
plain s2s-serve waits without limit).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from ray import serve
from ray.exceptions import RayActorError, RayError, RayTaskError
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.types import ASGIApp, Receive, Scope, Send

import runtime
from runtime.errors import InvalidOptionError
from serve.app import create_app
from serve.backend import GenerationResult, Token
from serve.batcher import Batcher, BatchLimits
from serve.cli import DEFAULT_MAX_INPUT_TOKENS, load_encoder_decoder
from serve.schema import GenerateRequest, RequestValidator, ServeError, info_body

DEFAULT_MAX_CONCURRENT_REQUESTS = 128  # as s2s-serve's --max-concurrent-requests
# how long a stopping replica may go on answering what it holds (see the module docstring); Ray Serve's is 20 s
DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S = 3600.0


@serve.deployment
class S2SGenerator:
    """One replica: the model and its dynamic batcher. The `GenerationBackend` calls, over handles."""

    def __init__(self, export_dir: str, *, provider: str = "auto", threads: int | None = None,
                 limits: BatchLimits = BatchLimits()):
        self.model = load_encoder_decoder(export_dir, provider=provider, threads=threads)
        self.limits = limits
        self.batcher = Batcher(self.model, limits)
        self.batcher.start()

    async def generate(self, request: GenerateRequest) -> GenerationResult | ServeError:
        """The whole answer, or the ServeError to answer instead (422 over the token budget, 500 a failed
        generation, 503 shutting down): returned, not raised, so that Ray logs no traceback for it."""
        try:
            return await self.batcher.generate(request)
        except ServeError as err:
            return err

    async def generate_stream(self, request: GenerateRequest) -> AsyncIterator[Token | GenerationResult | ServeError]:
        """Each token but the last as it is chosen, then the GenerationResult; or, at any point, a
        ServeError as the last event (call with stream=True)."""
        try:
            async for event in self.batcher.generate_stream(request):
                yield event
        except ServeError as err:
            yield err

    def info(self, *, max_input_tokens: int, max_stop_sequences: int, max_concurrent_requests: int) -> dict[str, Any]:
        """GET /info's body for this replica's model and limits (serve.schema.info_body)."""
        return info_body(self.model, max_input_tokens=max_input_tokens, max_stop_sequences=max_stop_sequences,
                         max_concurrent_requests=max_concurrent_requests,
                         max_batch_size=self.limits.max_batch_size, max_batch_tokens=self.limits.max_batch_tokens,
                         max_wait_ms=self.limits.max_wait_ms)

    def __del__(self):  # Ray Serve calls it once the replica's requests in flight are answered
        self.batcher.close()


class RayBackend:
    """The `GenerationBackend` of the ingress: each call goes to a generator replica through `handle`.

    A replica that dies while it holds a request fails that request with a 500 JSON error naming what
    happened (the client may send it again: Ray Serve routes it to a live replica); the ServeErrors a
    replica returns (422, 500, 503) reach the client as they are. A client that leaves cancels its call
    on the replica, which drops the request from its batch.
    """

    def __init__(self, handle: DeploymentHandle):
        self._handle = handle
        self._streaming = handle.options(stream=True)

    async def generate(self, request: GenerateRequest) -> GenerationResult:
        response = self._handle.generate.remote(request)
        try:
            result = await response
        except asyncio.CancelledError:
            response.cancel()
            raise
        except RayError as err:
            raise _replica_failure(err) from None
        if isinstance(result, ServeError):
            raise result
        return result

    async def generate_stream(self, request: GenerateRequest) -> AsyncIterator[Token | GenerationResult]:
        events = self._streaming.generate_stream.remote(request)
        try:
            async for event in events:
                if isinstance(event, ServeError):
                    raise event
                yield event
        except RayError as err:
            raise _replica_failure(err) from None
        finally:
            events.cancel()  # a no-op once the stream has ended; else the client left


def _replica_failure(err: RayError) -> ServeError:
    """What the client is told when a replica call fails in Ray (the replica's own errors are ServeErrors)."""
    cause = err.cause if isinstance(err, RayTaskError) and err.cause is not None else err
    if isinstance(cause, RayActorError):
        return ServeError.generation("the model replica generating this request stopped (its process died or "
                                     "became unreachable); Ray Serve starts a new one: send the request again")
    return ServeError.generation(f"{type(cause).__name__}: {cause}")


class _ThisReplicasApp:
    """The ASGI app S2SIngress is wrapped in. `serve.ingress` takes an app when the class is defined,
    but this one is built from what the replica holds (the validator's model, the generator's handle);
    a replica is a process of its own, so the app it built is process-wide, and this forwards to it."""

    app: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _ThisReplicasApp.app(scope, receive, send)


@serve.deployment
@serve.ingress(_ThisReplicasApp())
class S2SIngress:
    """TGI's HTTP API (serve.app.create_app) over the generator replicas behind `generator`."""

    async def __init__(self, generator: DeploymentHandle, export_dir: str, *, max_input_tokens: int | None = None,
                       max_stop_sequences: int = 4, max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS):
        model = load_encoder_decoder(export_dir, provider="cpu", threads=1)  # read by the validator; never generates
        max_input_tokens = _max_input_tokens(model, max_input_tokens)
        info = await generator.info.remote(max_input_tokens=max_input_tokens, max_stop_sequences=max_stop_sequences,
                                           max_concurrent_requests=max_concurrent_requests)
        _ThisReplicasApp.app = create_app(RayBackend(generator),
                                          RequestValidator(model, max_input_tokens, max_stop_sequences), info,
                                          max_concurrent_requests=max_concurrent_requests)


def _max_input_tokens(model: runtime.Model, max_input_tokens: int | None) -> int:
    """The longest input a request may have: as given (within the model's limit), else the model's limit,
    else DEFAULT_MAX_INPUT_TOKENS.

    Raises:
        InvalidOptionError: max_input_tokens exceeds the model's limit.
    """
    limit = model.manifest.max_source_positions
    if max_input_tokens is None:
        return limit or DEFAULT_MAX_INPUT_TOKENS
    if limit is not None and max_input_tokens > limit:
        raise InvalidOptionError(f"--max-input-tokens {max_input_tokens} exceeds the model's limit of {limit} tokens")
    return max_input_tokens


def _replica_resources(provider: str, threads: int | None) -> dict[str, Any]:
    """ray_actor_options of a generator replica: a CPU per onnxruntime thread (one when threads is None,
    onnxruntime then using every core it sees), and a GPU for provider="cuda"."""
    resources: dict[str, Any] = {"num_cpus": threads or 1}
    if provider == "cuda":
        resources["num_gpus"] = 1
    return resources


def build_app(export_dir: str | Path, *, num_replicas: int = 1, provider: str = "auto", threads: int | None = None,
              limits: BatchLimits = BatchLimits(), max_input_tokens: int | None = None, max_stop_sequences: int = 4,
              max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS,
              graceful_shutdown_timeout_s: float = DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S) -> Application:
    """The Serve application of `s2s-serve EXPORT --ray`: `num_replicas` S2SGenerator replicas behind one
    S2SIngress. Arguments are s2s-serve's flags; export_dir is made absolute (replicas may run elsewhere).
    graceful_shutdown_timeout_s: how long a stopping replica of either deployment may go on answering the
    requests it holds before Ray Serve kills it (an hour by default; see the module docstring)."""
    export_dir = str(Path(export_dir).resolve())
    generator = S2SGenerator.options(
        num_replicas=num_replicas,
        # the ingress bounds what is in flight (429 beyond it); Ray Serve's default of 5 per replica
        # would cap every batch at 5 requests
        max_ongoing_requests=max_concurrent_requests,
        ray_actor_options=_replica_resources(provider, threads),
        graceful_shutdown_timeout_s=graceful_shutdown_timeout_s,
    ).bind(export_dir, provider=provider, threads=threads, limits=limits)
    return S2SIngress.options(
        # room above the app's own limit: a request beyond it must reach the app to be answered 429
        # (and /health, /info, /metrics must get through), not wait in the proxy's queue
        max_ongoing_requests=2 * max_concurrent_requests,
        ray_actor_options={"num_cpus": 0},  # parsing and formatting only; it must not take a replica's CPU
        # a stream in flight passes through the ingress too: it must stay as long as the generator
        graceful_shutdown_timeout_s=graceful_shutdown_timeout_s,
    ).bind(generator, export_dir, max_input_tokens=max_input_tokens, max_stop_sequences=max_stop_sequences,
           max_concurrent_requests=max_concurrent_requests)
