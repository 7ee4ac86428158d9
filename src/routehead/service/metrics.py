"""Prometheus metrics for one app (``GET /metrics``), with ``prometheus-client``.

Each app gets its own ``CollectorRegistry`` so several apps in one process (tests, embedding) do not collide
and ``/metrics`` shows only this service.  Names follow Prometheus conventions (``_total`` counters, ``_seconds``
histograms).  Outcomes are coarse and bounded (no client-controlled label values), so cardinality stays small.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
_TOKEN_BUCKETS = (128, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """The service's counters, gauges and histograms (see the README for what each one means)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("routehead_requests", "Re-rank requests by endpoint and outcome",
                                ["endpoint", "outcome"], registry=r)
        self.failures = Counter("routehead_request_failures", "Failed re-rank requests by reason",
                                ["reason"], registry=r)
        self.queue_size = Gauge("routehead_queue_size", "Requests waiting for a model replica", registry=r)
        self.busy_replicas = Gauge("routehead_busy_replicas", "Model replicas running a batch", registry=r)
        self.in_flight = Gauge("routehead_requests_in_flight", "Admitted requests (queued or running)",
                               registry=r)
        self.ready = Gauge("routehead_ready", "1 when the model is loaded and warmed up", registry=r)
        self.throughput = Gauge("routehead_replica_tokens_per_second", "Measured prompt tokens/s of one replica "
                                "(the mean over recent model calls; admission estimates waits with it)", registry=r)
        self.batch_size = Histogram("routehead_batch_size", "Requests per model call", buckets=_BATCH_BUCKETS,
                                    registry=r)
        self.batch_tokens = Histogram("routehead_batch_tokens", "Prompt tokens per model call (the reranker's count)",
                                      buckets=_TOKEN_BUCKETS, registry=r)
        self.batch_retries = Counter("routehead_batch_retries", "Batches retried one request at a time after "
                                     "an error", registry=r)
        self.cancelled_passes = Counter("routehead_cancelled_passes", "Model calls stopped at a layer boundary "
                                        "because no request in them was still awaited (client gone, timed out, or "
                                        "answered 503 by the shutdown drain)",
                                        registry=r)
        self.queue_time = Histogram("routehead_queue_duration_seconds", "Time a request waited in the queue",
                                    buckets=_LATENCY_BUCKETS, registry=r)
        self.inference_time = Histogram("routehead_inference_duration_seconds",
                                        "Model time of the call that served a request", buckets=_LATENCY_BUCKETS,
                                        registry=r)
        self.total_time = Histogram("routehead_request_duration_seconds", "Total time handling a re-rank "
                                    "request", buckets=_LATENCY_BUCKETS, registry=r)
        self.documents = Counter("routehead_documents", "Documents re-ranked", registry=r)

    def observe_batch(self, size: int, tokens: int) -> None:
        self.batch_size.observe(size)
        self.batch_tokens.observe(tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)
