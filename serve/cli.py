"""s2s-serve: serve an export directory over TGI's HTTP API, with dynamic batching.

One process, one loaded model, one batching worker thread (serve/batcher.py) behind a Starlette app
(serve/app.py) on uvicorn. Flags are named as TGI names them where TGI has them. SIGTERM (or Ctrl-C)
stops accepting connections, lets the requests in flight finish, runs what is queued, and exits 0.
"""

from __future__ import annotations

import importlib
import json
import logging
import signal
import socket
import sys
from pathlib import Path

import click

import runtime
from runtime.clickutil import S2SCommand
from runtime.errors import ExportDirError, InvalidOptionError

EPILOG = """\b
Examples:
  s2s-serve out/t5
  s2s-serve out/t5 --port 8080 --max-batch-size 16 --max-wait-ms 10
  s2s-serve out/t5 --ray --num-replicas 2 --threads 1          # Ray Serve, 2 model replicas
  curl -s localhost:8080/generate -H 'Content-Type: application/json' \\
       -d '{"inputs": "translate English to German: Hello", "parameters": {"max_new_tokens": 20}}'
"""

# T5 has relative positions, hence no input limit of its own; TGI's default max input length is 1024 too
DEFAULT_MAX_INPUT_TOKENS = 1024
SERVE_EXTRA = ("starlette", "uvicorn", "prometheus_client")  # what `pip install 's2s[serve]'` brings

log = logging.getLogger("serve")


@click.command(cls=S2SCommand, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("export_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535),
              help="Port to listen on (0: any free port, printed at startup).")
@click.option("--provider", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="onnxruntime execution provider (auto: CUDA when it works, else CPU).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Intra-op threads per onnxruntime session (default: every core).")
@click.option("--max-batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Most requests generated in one call.")
@click.option("--max-batch-tokens", type=click.IntRange(min=1), default=32768, show_default=True,
              help="Most padded tokens in one call: rows (one per beam) x (longest input + most new tokens).")
@click.option("--max-wait-ms", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="How long the oldest queued request waits for others to batch with.")
@click.option("--max-concurrent-requests", type=click.IntRange(min=1), default=128, show_default=True,
              help="Requests in flight (queued or generating) beyond which the server answers 429.")
@click.option("--max-input-tokens", type=click.IntRange(min=1), default=None,
              help=f"Longest input, in tokens (default: the model's limit, or {DEFAULT_MAX_INPUT_TOKENS}).")
@click.option("--max-stop-sequences", type=click.IntRange(min=0), default=4, show_default=True,
              help="Most strings a request's `stop` parameter may list.")
@click.option("--ray", "on_ray", is_flag=True,
              help="Serve on Ray Serve: --num-replicas model replicas behind one HTTP ingress (serve/ray_*.py).")
@click.option("--num-replicas", type=click.IntRange(min=1), default=None,
              help="With --ray: model replicas, each a process with its own batcher (default 1).")
@click.option("--ray-address", default=None,
              help="With --ray: the Ray cluster to join (auto, HOST:6379, ray://HOST:10001; default: a local Ray).")
@click.option("--json-logs", is_flag=True, help="Log JSON lines instead of text.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="Least severe log records written (info: one line per request).")
def main(export_dir: Path, host: str, port: int, provider: str, threads: int | None, max_batch_size: int,
         max_batch_tokens: int, max_wait_ms: float, max_concurrent_requests: int, max_input_tokens: int | None,
         max_stop_sequences: int, on_ray: bool, num_replicas: int | None, ray_address: str | None, json_logs: bool,
         log_level: str) -> None:
    """Serve EXPORT_DIR (written by s2s-export) over TGI's HTTP API: POST /generate, /generate_stream, /;
    GET /health, /info, /metrics."""
    _configure_logging(json_logs, log_level)
    if not on_ray and (num_replicas is not None or ray_address is not None):
        raise InvalidOptionError("--num-replicas and --ray-address apply to --ray only: add --ray")
    _check_serve_extra()
    import uvicorn

    from serve.app import create_app
    from serve.batcher import Batcher, BatchLimits
    from serve.metrics import ServerMetrics
    from serve.schema import RequestValidator, info_body

    model = load_encoder_decoder(export_dir, provider=provider, threads=threads)
    model.options()  # a generation_config this runtime cannot honour fails now, not at the first request
    limit = model.manifest.max_source_positions
    if max_input_tokens is None:
        max_input_tokens = limit or DEFAULT_MAX_INPUT_TOKENS
    elif limit is not None and max_input_tokens > limit:
        raise InvalidOptionError(f"--max-input-tokens {max_input_tokens} exceeds the model's limit of {limit} tokens")
    limits = BatchLimits(max_batch_size, max_batch_tokens, max_wait_ms)
    if on_ray:
        from serve.ray_cli import serve_on_ray

        del model  # checked; each replica loads its own
        serve_on_ray(export_dir, address=ray_address, host=host, port=port, num_replicas=num_replicas or 1,
                     provider=provider, threads=threads, limits=limits, max_input_tokens=max_input_tokens,
                     max_stop_sequences=max_stop_sequences, max_concurrent_requests=max_concurrent_requests)
        return
    listener = _listen(host, port)
    metrics = ServerMetrics()
    batcher = Batcher(model, limits, metrics)
    info = info_body(model, max_input_tokens=max_input_tokens, max_stop_sequences=max_stop_sequences,
                     max_concurrent_requests=max_concurrent_requests, max_batch_size=max_batch_size,
                     max_batch_tokens=max_batch_tokens, max_wait_ms=max_wait_ms)
    app = create_app(batcher, RequestValidator(model, max_input_tokens, max_stop_sequences), info,
                     max_concurrent_requests=max_concurrent_requests, metrics=metrics)
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    # uvicorn re-raises SIGTERM/SIGINT once its graceful shutdown is done, so that the previous handler
    # runs; with these, that is "nothing", and the process exits 0 after draining
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    bound_host, bound_port = listener.getsockname()[:2]
    batcher.start()
    log.info("s2s-serve %s (%s, %s) listening on http://%s:%d", export_dir, model.manifest.model_type or "model",
             model.provider, bound_host, bound_port)
    try:
        server.run(sockets=[listener])
    finally:
        batcher.close()
    log.info("s2s-serve stopped: every request in flight was answered")


def load_encoder_decoder(export_dir: str | Path, *, provider: str, threads: int | None) -> runtime.Model:
    """runtime.load, for the kind of export s2s-serve serves.

    Raises:
        ExportDirError: not an export directory, or one of another kind (decoder-only, regressor);
            and what runtime.load raises.
    """
    model = runtime.load(export_dir, provider=provider, threads=threads)
    if not isinstance(model, runtime.Model):
        raise ExportDirError(f"{str(export_dir)!r} holds a {model.manifest.kind} model; s2s-serve serves "
                             "encoder-decoder exports")
    return model


def _check_serve_extra() -> None:
    """Raises: click.ClickException (one line): a package of the [serve] extra is not installed."""
    for module in SERVE_EXTRA:
        try:
            importlib.import_module(module)
        except ImportError:
            raise click.ClickException(f"s2s-serve needs {module}, from its [serve] extra, which is not installed: "
                                       "pip install 's2s[serve]'") from None


def _listen(host: str, port: int) -> socket.socket:
    """Bind and listen before serving, so a port in use is one clear error, port 0 tells its number and
    the "listening" line is true when printed (connections wait in the backlog until uvicorn accepts)."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        listener = socket.socket(info[0], socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(info[4])
        listener.listen(2048)  # uvicorn's default backlog
    except OSError as err:
        raise InvalidOptionError(f"cannot listen on {host}:{port}: {err.strerror or err}; pick another --host/--port") \
            from None
    return listener


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def _configure_logging(json_logs: bool, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if json_logs else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
