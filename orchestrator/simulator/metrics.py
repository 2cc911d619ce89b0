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
    computed = stats.prompt_tokens - stats.prefix_cache_hits
    metric("vllm:prompt_tokens_cached_total", "counter", "Number of cached prompt tokens (local prefix cache).",
           stats.prefix_cache_hits)
    lines.append("# HELP vllm:prompt_tokens_by_source Number of prompt tokens by source.")
    lines.append("# TYPE vllm:prompt_tokens_by_source counter")
    for source, value in (("local_compute", computed), ("local_cache_hit", stats.prefix_cache_hits),
                          ("external_kv_transfer", 0)):
        lines.append(f'vllm:prompt_tokens_by_source_total{{{labels},source="{source}"}} {value}')
    lines.append("# HELP vllm:num_requests_waiting_by_reason Number of waiting requests by reason.")
    lines.append("# TYPE vllm:num_requests_waiting_by_reason gauge")
    for reason, value in (("capacity", len(engine.waiting)), ("deferred", 0)):
        lines.append(f'vllm:num_requests_waiting_by_reason{{{labels},reason="{reason}"}} {value}')
    lines.append("# HELP vllm:engine_sleep_state Engine sleep state; awake = 1 means engine is awake.")
    lines.append("# TYPE vllm:engine_sleep_state gauge")
    for state, value in (("awake", 1), ("weights_offloaded", 0), ("discard_all", 0)):
        lines.append(f'vllm:engine_sleep_state{{{labels},sleep_state="{state}"}} {value}')
    metric("vllm:corrupted_requests_total", "counter", "Corrupted requests, in terms of total number of requests "
           "with NaNs in logits.", 0)
    metric("vllm:admission_rejections_total", "counter", "Requests rejected by admission control (503).", 0)
    metric("vllm:external_prefix_cache_queries_total", "counter", "External prefix cache queries (KV connector).", 0)
    metric("vllm:external_prefix_cache_hits_total", "counter", "External prefix cache hits (KV connector).", 0)
    metric("vllm:mm_cache_queries_total", "counter", "Multi-modal cache queries, in terms of number of queried items.",
           0)
    metric("vllm:mm_cache_hits_total", "counter", "Multi-modal cache hits, in terms of number of cached items.", 0)
    lines.append("# HELP vllm:lora_requests_info Running stats on lora requests.")
    lines.append("# TYPE vllm:lora_requests_info gauge")
    lines.append('vllm:lora_requests_info{max_lora="0",running_lora_adapters="",waiting_lora_adapters=""} 1.0')
    histogram("vllm:iteration_tokens_total", "Histogram of number of tokens per engine_step.", stats.iteration_tokens)
    histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.", stats.request_prompt_tokens)
    histogram("vllm:request_generation_tokens", "Number of generation tokens processed.",
              stats.request_generation_tokens)
    histogram("vllm:request_max_num_generation_tokens", "Histogram of maximum number of requested generation tokens.",
              stats.request_generation_tokens)
    histogram("vllm:request_params_n", "Histogram of the n request parameter.", stats.request_params_n)
    histogram("vllm:request_params_max_tokens", "Histogram of the max_tokens request parameter.",
              stats.request_params_max_tokens)
    histogram("vllm:request_prefill_kv_computed_tokens", "Histogram of new KV tokens computed during prefill "
              "(excluding cached tokens).", stats.request_prefill_kv_computed_tokens)
    histogram("vllm:request_num_preemptions", "Number of preemptions per request.", stats.request_preemptions)
    histogram("vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
              stats.inter_token_latency)
    histogram("vllm:request_time_per_output_token_seconds", "Histogram of time_per_output_token_seconds per request.",
              stats.time_per_output_token)
    histogram("vllm:request_inference_time_seconds", "Histogram of time spent in RUNNING phase for request.",
              stats.inference_time)
    histogram("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.",
              stats.prefill_time)
    histogram("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.",
              stats.decode_time)
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
