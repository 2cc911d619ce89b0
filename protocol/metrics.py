"""Prometheus metrics for worker processes and the inference client, and the ``/metrics`` endpoint.

Needs ``prometheus-client`` (``pip install 'orchestrator[metrics]'``); nothing imports this module
unless metrics were asked for. Each process (or test) uses its own ``CollectorRegistry``, never the
global default, so several can live in one interpreter. The classes here implement the small
observer hooks of ``WorkerRuntime`` (``RuntimeObserver``) and ``InferenceClient``
(``InferenceObserver``); they do O(1) work per call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from protocol.errors import ConfigError

try:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
except ImportError as exc:  # an optional extra: say how to get it instead of a bare traceback
    raise ConfigError("metrics need prometheus-client: pip install 'orchestrator[metrics]'") from exc

from protocol.envelope import Envelope
from protocol.usage import Usage

__all__ = ("InferenceMetrics", "MetricsServer", "WorkerMetrics", "children", "serve_metrics")

M = TypeVar("M", Counter, Gauge, Histogram)

# Handlers and LLM calls take from milliseconds to many minutes.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


@dataclass(frozen=True, slots=True)
class MetricsServer:
    """A running ``/metrics`` endpoint; ``close()`` stops it."""

    host: str
    port: int
    _server: Any

    @property
    def url(self) -> str:
        """Where to scrape."""
        return f"http://{self.host if self.host not in ('', '0.0.0.0') else '127.0.0.1'}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and free the port."""
        self._server.shutdown()
        self._server.server_close()


def serve_metrics(port: int, registry: CollectorRegistry, *, host: str = "0.0.0.0") -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread; port 0 picks a free one."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(host, int(server.server_port), server)


def children(metric: M) -> Callable[..., M]:
    """``child(*label_values)``: ``metric.labels(...)`` cached per label values (a dict look-up after the first)."""
    cache: dict[tuple[str, ...], M] = {}

    def child(*values: str) -> M:
        found = cache.get(values)
        if found is None:
            found = cache[values] = metric.labels(*values)
        return found

    return child


class WorkerMetrics:
    """``orchestrator_worker_*``: tasks handled by outcome, handler duration, handlers in flight."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.handled = Counter("orchestrator_worker_tasks_handled", "Messages a worker handled, by outcome "
                               "(done, failed, timed_out, cancelled, verified, handed_back)",
                               ("capability", "outcome"), registry=registry)
        self.duration = Histogram("orchestrator_worker_handler_duration_seconds", "Time a handler ran",
                                  ("capability",), buckets=DURATION_BUCKETS, registry=registry)
        self.in_flight = Gauge("orchestrator_worker_in_flight", "Handlers running now", ("capability",),
                               registry=registry)

        self._handled = children(self.handled)
        self._duration = children(self.duration)
        self._in_flight = children(self.in_flight)

    def handler_started(self, capability: str, envelope: Envelope) -> None:
        """A handler began working on ``envelope``."""
        self._in_flight(capability).inc()

    def handler_finished(self, capability: str, envelope: Envelope, outcome: str, duration_s: float) -> None:
        """A handler ended (``outcome``) after ``duration_s``."""
        self._in_flight(capability).dec()
        self._handled(capability, outcome).inc()
        self._duration(capability).observe(duration_s)


class InferenceMetrics:
    """``orchestrator_llm_*``: requests by status and outcome, tokens, latency, retries."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("orchestrator_llm_requests", "HTTP requests to the LLM server (each try), by "
                                "status code and outcome (ok, error, timeout, unavailable, cancelled: a stream the caller stopped reading)",
                                ("endpoint", "status", "outcome"), registry=registry)
        self.tokens = Counter("orchestrator_llm_tokens", "Tokens used, by kind (prompt, completion)", ("kind",),
                              registry=registry)
        self.latency = Histogram("orchestrator_llm_request_duration_seconds", "Time of one request to the LLM "
                                 "server", ("endpoint",), buckets=DURATION_BUCKETS, registry=registry)
        self.retries = Counter("orchestrator_llm_retries", "Requests tried again after a retryable failure",
                               registry=registry)

    def request_finished(self, endpoint: str, status: int | None, outcome: str, duration_s: float) -> None:
        """One try at ``endpoint`` ended with HTTP ``status`` (None: no response)."""
        self.requests.labels(endpoint, str(status or ""), outcome).inc()
        self.latency.labels(endpoint).observe(duration_s)

    def request_retried(self, error: Exception) -> None:
        """A failed try will be tried again."""
        self.retries.inc()

    def usage_recorded(self, usage: Usage) -> None:
        """A completion's token usage."""
        if usage.prompt_tokens:
            self.tokens.labels("prompt").inc(usage.prompt_tokens)
        if usage.completion_tokens:
            self.tokens.labels("completion").inc(usage.completion_tokens)
