"""Prometheus metrics of one server (GET /metrics, text exposition format).

Each `ServerMetrics` has its own registry, so several apps in one process (tests) count apart.
Names follow TGI's (`tgi_request_count`, `tgi_queue_size`, `tgi_batch_current_size`, ...) with an
`s2s_` prefix:

    s2s_requests_total{status}          responses by HTTP status, every route
    s2s_queue_size                      requests waiting for a batch
    s2s_batch_size                      requests per generate call (histogram)
    s2s_batch_duration_seconds          time a generate call took (histogram)
    s2s_request_duration_seconds        time from admission to the last byte of a generation (histogram)
    s2s_generated_tokens_total          tokens generated, every sequence of every request
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("s2s_requests", "HTTP responses by status code", ["status"], registry=self.registry)
        self.queue_size = Gauge("s2s_queue_size", "Requests waiting for a batch", registry=self.registry)
        self.batch_size = Histogram("s2s_batch_size", "Requests per generate call", buckets=BATCH_BUCKETS,
                                    registry=self.registry)
        self.batch_duration = Histogram("s2s_batch_duration_seconds", "Time one generate call took",
                                        buckets=LATENCY_BUCKETS, registry=self.registry)
        self.request_duration = Histogram("s2s_request_duration_seconds",
                                          "Time from admission to the end of a generation request",
                                          buckets=LATENCY_BUCKETS, registry=self.registry)
        self.generated_tokens = Counter("s2s_generated_tokens", "Tokens generated", registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
