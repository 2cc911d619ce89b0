"""Prometheus text exposition with vLLM's metric names, from the simulator's live state."""

from __future__ import annotations

from .config import SimConfig
from .engine import Engine
from .stats import Histogram, SimStats

__all__ = ("render_metrics",)


def render_metrics(config: SimConfig, engine: Engine, stats: SimStats) -> str:
    """The body of ``GET /metrics`` (text/plain; version=0.0.4)."""
    labels = f'engine="0",model_name="{config.model}"'
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, value: float, extra: str = "") -> None:
        base = name.removesuffix("_total") if kind == "counter" else name
        lines.append(f"# HELP {base} {help_}")
        lines.append(f"# TYPE {base} {kind}")
        lines.append(f"{name}{{{labels}{extra}}} {value}")

    def histogram(name: str, help_: str, hist: Histogram) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} histogram")
        for le, count in hist.cumulative():
            lines.append(f'{name}_bucket{{{labels},le="{le}"}} {count}')
        lines.append(f"{name}_sum{{{labels}}} {hist.total}")
        lines.append(f"{name}_count{{{labels}}} {hist.n}")

    metric("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
           len(engine.running))
    metric("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", len(engine.waiting))
    metric("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", engine.kv_usage)
    metric("vllm:num_preemptions_total", "counter", "Cumulative number of preemption from the engine.",
           stats.preemptions)
    metric("vllm:prefix_cache_queries_total", "counter", "Prefix cache queries, in terms of number of queried tokens.",
           stats.prefix_cache_queries)
    metric("vllm:prefix_cache_hits_total", "counter", "Prefix cache hits, in terms of number of cached tokens.",
           stats.prefix_cache_hits)
    metric("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", stats.prompt_tokens)
    metric("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.",
           stats.generation_tokens)
    lines.append("# HELP vllm:request_success Count of successfully processed requests.")
    lines.append("# TYPE vllm:request_success counter")
    for reason in ("stop", "length", "abort"):
        lines.append(f'vllm:request_success_total{{{labels},finished_reason="{reason}"}} '
                     f"{stats.finished_by_reason.get(reason, 0)}")
    histogram("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", stats.ttft)
    histogram("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", stats.e2e)
    histogram("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
              stats.queue_time)
    lines.append("# HELP vllm:cache_config_info Information of the LLMEngine CacheConfig")
    lines.append("# TYPE vllm:cache_config_info gauge")
    lines.append(f'vllm:cache_config_info{{block_size="{config.block_size}",'
                 f'enable_prefix_caching="{config.enable_prefix_caching}",engine="0",'
                 f'num_gpu_blocks="{engine.pool.num_blocks}"}} 1.0')
    return "\n".join(lines) + "\n"
