"""`s2s-serve EXPORT --ray`: run serve.ray_deployment's application on Ray Serve until SIGTERM.

Without --ray-address (and without RAY_ADDRESS set), a local Ray instance is started for the
application and stopped with it; with one (`auto`, `HOST:6379`, `ray://HOST:10001`), the process
joins that cluster as a driver and leaves it as it found it. Ray Serve is started with its HTTP
proxy on --host/--port, unless it already runs on the cluster (its proxy then keeps the address it
has, and Serve keeps running afterwards). The application is named "s2s" and answers at "/".
SIGTERM (or Ctrl-C) deletes the application (Ray Serve lets each replica answer the requests it
holds first, for up to an hour: serve.ray_deployment's DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S), stops
what this process started, and exits 0.

Nothing reaches the network: Ray's usage statistics are off unless RAY_USAGE_STATS_ENABLED says
otherwise, and a Ray instance started here has no dashboard.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

from runtime.errors import InvalidOptionError, first_line
from serve.batcher import BatchLimits

APP_NAME = "s2s"

log = logging.getLogger("serve")


def serve_on_ray(export_dir: Path, *, address: str | None, host: str, port: int, num_replicas: int, provider: str,
                 threads: int | None, limits: BatchLimits, max_input_tokens: int, max_stop_sequences: int,
                 max_concurrent_requests: int) -> None:
    """Deploy build_app(...) with these s2s-serve flags and serve until SIGTERM or SIGINT.

    Raises:
        InvalidOptionError: Ray is not installed; port is 0 (Ray Serve's proxy binds the port itself,
            on the cluster's nodes: a free port here says nothing about there); no Ray cluster answers
            at address; an application named "s2s" already runs on the cluster.
    """
    if port == 0:
        raise InvalidOptionError("--port 0 cannot be used with --ray: Ray Serve's proxy binds its port itself; "
                                 "give a port number")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
        from ray import serve
    except ImportError:
        raise InvalidOptionError("--ray needs Ray Serve, which is not installed: pip install 's2s[ray]'") from None
    from serve.ray_deployment import build_app

    starts_ray = address is None and not os.environ.get("RAY_ADDRESS")
    try:
        ray.init(address=address, **({"include_dashboard": False} if starts_ray else {}))
    except ConnectionError as err:
        raise InvalidOptionError(f"cannot join the Ray cluster at {address or os.environ.get('RAY_ADDRESS')!r}: "
                                 f"{first_line(err)} Start it (ray start --head) or leave --ray-address "
                                 "out for a local Ray") from None
    stopping: list[int] = []
    # after ray.init, which installs a SIGTERM handler of its own for drivers
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _: stopping.append(signum))
    starts_serve = False
    try:
        status = serve.status()
        if APP_NAME in status.applications:
            raise InvalidOptionError(f"Ray Serve on this cluster already runs an application named {APP_NAME!r}; "
                                     f"stop it first (serve.delete({APP_NAME!r}) or its s2s-serve)")
        starts_serve = not status.proxies
        if starts_serve:
            serve.start(http_options={"host": host, "port": port})
            where = f"http://{host}:{port}"
        else:
            where = "the address of Ray Serve's proxy, which already ran on this cluster (--host/--port not applied)"
        app = build_app(export_dir, num_replicas=num_replicas, provider=provider, threads=threads, limits=limits,
                        max_input_tokens=max_input_tokens, max_stop_sequences=max_stop_sequences,
                        max_concurrent_requests=max_concurrent_requests)
        serve.run(app, name=APP_NAME, route_prefix="/")
        log.info("s2s-serve --ray %s: %d replica(s) on Ray Serve, listening on %s", export_dir, num_replicas, where)
        while not stopping:  # a flag, not an Event: a handler must never wait for a lock its own thread holds
            time.sleep(0.2)
        log.info("s2s-serve --ray: %s, stopping the application", signal.Signals(stopping[0]).name)
        serve.delete(APP_NAME)
    finally:
        if starts_serve:
            serve.shutdown()
        ray.shutdown()
    log.info("s2s-serve --ray stopped: every request in flight was answered")
