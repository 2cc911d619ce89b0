"""Counters the simulator keeps for /metrics and for tests."""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

__all__ = ("Histogram", "SimStats")

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                    10.0, 20.0, 40.0, 80.0)

_COUNT_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0)
_TOKEN_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0, 20000.0,
                  50000.0, 100000.0)


@dataclass
class Histogram:
    """A Prometheus-style cumulative histogram."""

    buckets: tuple[float, ...] = _LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def observe(self, value: float) -> None:
        """Add one observation."""
        if not self.counts:
            self.counts = [0] * len(self.buckets)
        i = bisect.bisect_left(self.buckets, value)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += value
        self.n += 1

    def cumulative(self) -> list[tuple[str, int]]:
        """(le, count) pairs including +Inf."""
        out: list[tuple[str, int]] = []
        acc = 0
        counts = self.counts or [0] * len(self.buckets)
        for le, c in zip(self.buckets, counts, strict=True):
            acc += c
            out.append((repr(le), acc))
        out.append(("+Inf", self.n))
        return out


@dataclass
class SimStats:
    """What the simulator has seen and done; read it in tests as ``sim.stats``."""

    requests_by_status: Counter[int] = field(default_factory=Counter)
    requests_by_endpoint: Counter[str] = field(default_factory=Counter)
    faults_injected: Counter[str] = field(default_factory=Counter)
    ignored_fields: Counter[str] = field(default_factory=Counter)
    finished_by_reason: Counter[str] = field(default_factory=Counter)
    batch_sizes: Counter[int] = field(default_factory=Counter)
    steps: int = 0
    busy_virtual_s: float = 0.0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    prefill_computed_tokens: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    preemptions: int = 0
    max_waiting: int = 0
    aborted: int = 0
    ttft: Histogram = field(default_factory=Histogram)
    e2e: Histogram = field(default_factory=Histogram)
    queue_time: Histogram = field(default_factory=Histogram)
    request_params_n: Histogram = field(default_factory=lambda: Histogram(_COUNT_BUCKETS))
    request_params_max_tokens: Histogram = field(default_factory=lambda: Histogram(_TOKEN_BUCKETS))
    request_prompt_tokens: Histogram = field(default_factory=lambda: Histogram(_TOKEN_BUCKETS))
    request_generation_tokens: Histogram = field(default_factory=lambda: Histogram(_TOKEN_BUCKETS))
    request_prefill_kv_computed_tokens: Histogram = field(default_factory=lambda: Histogram(_TOKEN_BUCKETS))
    iteration_tokens: Histogram = field(default_factory=lambda: Histogram(_TOKEN_BUCKETS))
    inter_token_latency: Histogram = field(default_factory=Histogram)
    time_per_output_token: Histogram = field(default_factory=Histogram)
    inference_time: Histogram = field(default_factory=Histogram)
    prefill_time: Histogram = field(default_factory=Histogram)
    decode_time: Histogram = field(default_factory=Histogram)
    request_preemptions: Histogram = field(default_factory=lambda: Histogram(_COUNT_BUCKETS))

    @property
    def cache_hit_rate(self) -> float:
        """Prefix-cache hits over queries, in tokens (0 when nothing was queried)."""
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    @property
    def max_batch_size(self) -> int:
        """Largest number of sequences scheduled in one step."""
        return max(self.batch_sizes, default=0)

    @property
    def completed(self) -> int:
        """Generation requests that finished normally."""
        return sum(self.finished_by_reason.values())

    def snapshot(self) -> dict[str, object]:
        """A JSON-ready summary (served on ``/_sim/state``)."""
        return {
            "requests_by_status": {str(k): v for k, v in self.requests_by_status.items()},
            "requests_by_endpoint": dict(self.requests_by_endpoint),
            "faults_injected": dict(self.faults_injected),
            "ignored_fields": dict(self.ignored_fields),
            "finished_by_reason": dict(self.finished_by_reason),
            "completed": self.completed,
            "steps": self.steps,
            "busy_virtual_s": self.busy_virtual_s,
            "max_batch_size": self.max_batch_size,
            "mean_batch_size": (sum(k * v for k, v in self.batch_sizes.items()) / self.steps) if self.steps else 0.0,
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "prefill_computed_tokens": self.prefill_computed_tokens,
            "prefix_cache_queries": self.prefix_cache_queries,
            "prefix_cache_hits": self.prefix_cache_hits,
            "cache_hit_rate": self.cache_hit_rate,
            "preemptions": self.preemptions,
            "max_waiting": self.max_waiting,
            "aborted": self.aborted,
        }
