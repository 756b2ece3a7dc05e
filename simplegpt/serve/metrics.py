"""The server's Prometheus metrics (GET /metrics): requests by route and status, tokens in and out,
time to first token, latency, queue depth and batch occupancy. One registry per app, so two apps
in one process count apart."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class Metrics:
    """The counters; queued() and running() are read at each scrape."""

    def __init__(self, queued: Callable[[], int], running: Callable[[], int], max_batch: int):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("simplegpt_requests", "HTTP requests answered, by route and status",
                                ["method", "route", "status"], registry=r)
        self.prompt_tokens = Counter("simplegpt_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("simplegpt_generated_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("simplegpt_time_to_first_token_seconds",
                              "from a request's arrival to its first generated text", buckets=SECONDS, registry=r)
        self.latency = Histogram("simplegpt_request_latency_seconds", "from a request's arrival to its last byte",
                                 ["route"], buckets=SECONDS, registry=r)
        Gauge("simplegpt_queue_rows", "sequences waiting for a place in the batch",
              registry=r).set_function(queued)
        Gauge("simplegpt_batch_rows", "sequences in the running batch", registry=r).set_function(running)
        Gauge("simplegpt_batch_capacity", "the most sequences one decode step takes (--max-batch)",
              registry=r).set(max_batch)

    def request_done(self, method: str, path: str, status: int, seconds: float) -> None:
        """One answered request (Guard's on_done). Paths other than the API's count as 'other', so
        that clients cannot make a series per made-up path."""
        route = path if path in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics",
                                 "/") else "other"
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
