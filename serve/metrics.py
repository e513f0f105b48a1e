"""Prometheus metrics for `GET /metrics` (prometheus_client, in the serve extra).

One registry per app, so two servers in one process (tests) keep their own counts. The queue depth and
active rows are read from the engine when scraped; the rest is counted as answers go out.
"""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 (re-exported for the app)

_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


class Metrics:
  def __init__(self, stats: Callable[[], dict[str, int]]):
    self.registry = r = CollectorRegistry()
    Gauge('qwenvl_queue_depth', 'requests waiting for a decode row', registry=r).set_function(
        lambda: stats()['queued'])
    Gauge('qwenvl_active_rows', 'requests being decoded (rows of the KV cache in use)', registry=r).set_function(
        lambda: stats()['active'])
    self.tokens = Counter('qwenvl_output_tokens', 'tokens generated (rate() gives tokens/s)', registry=r)
    self.requests = Counter('qwenvl_requests', 'answers finished, by finish reason', ['finish_reason'],
                            registry=r)
    self.first_token = Histogram('qwenvl_time_to_first_token_seconds', 'from the request handed to the '
                                 'engine to its first token', buckets=_SECONDS, registry=r)
    self.latency = Histogram('qwenvl_request_latency_seconds', 'from the request handed to the engine to '
                             'its last token', buckets=_SECONDS, registry=r)

  def exposition(self) -> bytes:
    return generate_latest(self.registry)
