"""``serve(argv)``: run the simulator from a command line (``python -m orchestrator.simulator``)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import anyio

from .config import FaultRates, LatencyModel, SimConfig
from .policy import Policy
from .server import SimulatedVLLM

__all__ = ("build_parser", "serve")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; flag names follow ``vllm serve``."""
    p = argparse.ArgumentParser(prog="orchestrator sim-llm", description="Serve a simulated vLLM (scripted answers).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("model", nargs="?", default=None,
                   help="the model, as `vllm serve MODEL` takes it; the served name unless --served-model-name")
    p.add_argument("--served-model-name", nargs="+", default=None, help="default: MODEL, else sim-model")
    p.add_argument("--api-key", action="append", default=[], help="repeatable; guards /v1 like vLLM")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--kv-cache-tokens", type=int, default=262144)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-enable-prefix-caching", action="store_true")
    p.add_argument("--enable-prompt-tokens-details", action="store_true")
    p.add_argument("--time-scale", type=float, default=1.0, help="real seconds per simulated second")
    p.add_argument("--step-overhead", type=float, default=0.010, help="seconds per engine step")
    p.add_argument("--decode-per-seq", type=float, default=0.00008, help="seconds per decoding sequence per step")
    p.add_argument("--prefill-per-token", type=float, default=0.00025, help="seconds per uncached prompt token")
    p.add_argument("--jitter", type=float, default=0.0)
    p.add_argument("--fault-5xx", type=float, default=0.0, help="rate of HTTP 500 answers")
    p.add_argument("--fault-hang", type=float, default=0.0, help="rate of requests that never answer")
    p.add_argument("--fault-malformed", type=float, default=0.0)
    p.add_argument("--fault-mid-stream", type=float, default=0.0)
    p.add_argument("--policy", default=None, help="module:attr of a Policy (a class is instantiated)")
    p.add_argument("--seed", type=int, default=0)
    return p


def _load_policy(spec: str) -> Policy:
    module, _, attr = spec.partition(":")
    obj = getattr(importlib.import_module(module), attr)
    policy = obj() if isinstance(obj, type) else obj
    if not callable(policy):
        raise SystemExit(f"--policy {spec!r} is not callable")
    return policy  # type: ignore[no-any-return]  # checked callable above


def serve(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and serve until interrupted; returns an exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "serve":  # `python -m orchestrator.simulator serve MODEL ...` stands in for `vllm serve`
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    served = args.served_model_name or [args.model or "sim-model"]
    config = SimConfig(
        served_model_names=tuple(served), api_keys=tuple(args.api_key), host=args.host,
        port=args.port, max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_tokens=args.kv_cache_tokens,
        block_size=args.block_size, enable_prefix_caching=not args.no_enable_prefix_caching,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details, time_scale=args.time_scale,
        latency=LatencyModel(step_overhead_s=args.step_overhead, decode_s_per_seq=args.decode_per_seq,
                             prefill_s_per_token=args.prefill_per_token, jitter=args.jitter),
        faults=FaultRates(server_error=args.fault_5xx, hang=args.fault_hang, malformed=args.fault_malformed,
                          mid_stream_error=args.fault_mid_stream),
        seed=args.seed,
    )
    sim = SimulatedVLLM(config, policy=_load_policy(args.policy) if args.policy else None)
    try:
        anyio.run(sim.serve_forever)
    except KeyboardInterrupt:
        return 0
    return 0
