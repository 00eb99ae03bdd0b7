"""The HTTP layer: TGI's routes over any `GenerationBackend`. It parses, validates and formats; it never batches.

    from serve.app import create_app
    app = create_app(backend, validator, info, max_concurrent_requests=128)   # a Starlette ASGI app

`backend` is a `serve.backend.GenerationBackend` (`serve.batcher.Batcher` in s2s-serve; a Ray Serve
deployment can mount this same app with its own backend), `validator` a `serve.schema.RequestValidator`
and `info` the JSON of GET /info (`serve.schema.info_body`). Routes, as TGI has them:

    POST /generate          {"inputs", "parameters"} -> {"generated_text", "details"?}
    POST /generate_stream   server-sent events, one `data:` per token, the last with generated_text
    POST /                  either, by the body's "stream" (a list of one response when not streaming)
    GET  /health            200 while serving
    GET  /info              model, limits and versions
    GET  /metrics           Prometheus text format

Back-pressure: beyond `max_concurrent_requests` requests in flight (queued, generating or
streaming), a request is answered 429 at once, TGI's "Model is overloaded". Errors are TGI's JSON
`{"error", "error_type"}`: 400 unparseable body, 422 invalid request, 429 overloaded, 500 failed
generation, 404/405 unknown route or method; any other exception (a bug, a backend's own failure) is
a 500 `generation` error too (its traceback logged), or, mid-stream, an error event. A client that
disconnects, while its request is queued or generating, has it cancelled (the backend stops or drops
it) and is logged as 499. Each response is logged as one line on the "serve.access" logger.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from serve.backend import GenerationBackend, GenerationResult
from serve.metrics import ServerMetrics
from serve.schema import RequestValidator, ServeError, generate_body, stream_end_body, stream_token_body

access_log = logging.getLogger("serve.access")
log = logging.getLogger("serve.app")

T = TypeVar("T")


def create_app(backend: GenerationBackend, validator: RequestValidator, info: dict[str, Any], *,
               max_concurrent_requests: int = 128, metrics: ServerMetrics | None = None) -> Starlette:
    """The ASGI app of TGI's API over `backend` (see the module docstring)."""
    metrics = metrics if metrics is not None else ServerMetrics()
    admission = _Admission(max_concurrent_requests)

    async def generate(request: Request) -> Response:
        return await _generation(request, stream=False, as_list=False)

    async def generate_stream(request: Request) -> Response:
        return await _generation(request, stream=True, as_list=False)

    async def compat_generate(request: Request) -> Response:
        return await _generation(request, stream=None, as_list=True)

    async def _generation(request: Request, stream: bool | None, as_list: bool) -> Response:
        admission.acquire()  # before reading the body, as TGI takes its permit before validation
        started = time.monotonic()
        handed_over = False
        try:
            valid = validator.validate(await _json_body(request), stream=stream)
            request.state.input_tokens = len(valid.input_ids)
            if not valid.stream:
                result = await _unless_disconnected(request, backend.generate(valid))
                if result is None:
                    return _client_left(request)
                _account(request, result)
                body = generate_body(valid, result)
                return JSONResponse([body] if as_list else body)
            events = backend.generate_stream(valid)
            # watched like a whole answer, since a queued stream's client may leave before its first token;
            # an error before the first token is still a plain JSON answer
            first = await _unless_disconnected(request, anext(events))
            if first is None:
                await events.aclose()
                return _client_left(request)

            async def close() -> None:
                await events.aclose()
                admission.release()
                metrics.request_duration.observe(time.monotonic() - started)

            handed_over = True
            return _EventStream(_sse(request, valid, first, events), close)
        finally:
            if not handed_over:
                admission.release()
                metrics.request_duration.observe(time.monotonic() - started)

    async def _sse(request: Request, valid, event, events: AsyncIterator) -> AsyncIterator[bytes]:
        index = 0
        while not isinstance(event, GenerationResult):
            index += 1
            yield _event(stream_token_body(event, index))
            try:
                event = await anext(events)
            except Exception as err:  # noqa: BLE001 - whatever ends the stream, the client gets TGI's error event
                failure = err if isinstance(err, ServeError) else _unexpected(err)
                if failure is not err:
                    log.exception("the stream of a %s request failed", request.url.path)
                request.state.error = failure.message
                yield _event(failure.body())
                return
        _account(request, event)
        yield _event(stream_end_body(valid, event))

    def _account(request: Request, result: GenerationResult) -> None:
        tokens = sum(len(seq.tokens) for seq in result.sequences)
        metrics.generated_tokens.inc(tokens)
        request.state.generated_tokens = tokens
        request.state.finish_reason = result.sequences[0].finish_reason

    async def health(request: Request) -> Response:
        return Response(status_code=200)

    async def get_info(request: Request) -> Response:
        return JSONResponse(info)

    async def get_metrics(request: Request) -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    async def serve_error(request: Request, err: Exception) -> Response:
        assert isinstance(err, ServeError)
        request.state.error = err.message
        return JSONResponse(err.body(), status_code=err.status)

    async def unexpected_error(request: Request, err: Exception) -> Response:
        # Starlette's ServerErrorMiddleware calls this, then re-raises for the server to log the traceback
        failure = _unexpected(err)
        request.state.error = failure.message
        return JSONResponse(failure.body(), status_code=failure.status)

    async def http_error(request: Request, err: Exception) -> Response:
        assert isinstance(err, HTTPException)
        kind = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http")
        return JSONResponse({"error": f"{request.method} {request.url.path}: {err.detail}", "error_type": kind},
                            status_code=err.status_code, headers=err.headers)

    routes = [
        Route("/generate", generate, methods=["POST"]),
        Route("/generate_stream", generate_stream, methods=["POST"]),
        Route("/", compat_generate, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/info", get_info, methods=["GET"]),
        Route("/metrics", get_metrics, methods=["GET"]),
    ]
    app = Starlette(routes=routes, exception_handlers={ServeError: serve_error, HTTPException: http_error,
                                                       Exception: unexpected_error})
    app.add_middleware(_AccessLog, metrics=metrics)
    return app


class _Admission:
    """Requests in flight, bounded. Used from the event loop thread only, so a plain counter."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0

    def acquire(self) -> None:
        if self.in_flight >= self.limit:
            raise ServeError.overloaded()
        self.in_flight += 1

    def release(self) -> None:
        self.in_flight -= 1


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        raise ServeError.validation(f"the body is not valid JSON ({err})", status=400) from None


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """Await `work` and return its result (or raise its error); None if the client disconnects first.
    `work` is then cancelled, and this returns once the cancellation is done, when the backend has
    dropped the request."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request.receive))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this request's own handler is cancelled (the server stops): so is its work
        task.cancel()
        raise
    finally:
        gone.cancel()
    if task.done():
        return task.result()
    task.cancel()
    # not `await task`: that would raise the task's CancelledError as if this coroutine were cancelled
    await asyncio.wait({task})
    if not task.cancelled():
        task.exception()  # it ended (or failed) as it was cancelled; nobody reads the answer: mark it seen
    return None


def _client_left(request: Request) -> Response:
    request.state.error = "client disconnected"
    return Response(status_code=499)  # nobody reads it; the status only goes to the log and the counts


def _unexpected(err: Exception) -> ServeError:
    """The client's error for an exception that is not a ServeError (a bug, a backend's own failure)."""
    return ServeError.generation(f"{type(err).__name__}: {err}")


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _event(body: dict[str, Any]) -> bytes:
    return b"data:" + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


class _EventStream(StreamingResponse):
    """A server-sent event stream that always runs `close` at its end: finished, failed or abandoned."""

    def __init__(self, content: AsyncIterator[bytes], close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._close = close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._close()


class _AccessLog:
    """Counts every response by status and logs one line per request (fields in `extra["fields"]`)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500  # what the server answers if the app raises before responding

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.requests.labels(str(status)).inc()
            fields = {"method": scope["method"], "path": scope["path"], "status": status,
                      "ms": round((time.monotonic() - started) * 1000, 1)}
            fields.update(scope.get("state", {}))
            access_log.info(" ".join(f"{k}={v}" if k not in ("method", "path", "status") else str(v)
                                     for k, v in fields.items()), extra={"fields": fields})
