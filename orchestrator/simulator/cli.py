"""``serve(argv)``: run the simulator from a command line (``python -m orchestrator.simulator``).

The command line is a ``vllm serve`` command line: every option vLLM 0.33 accepts is accepted
(``_vllm_flags``). The options the simulator models shape it; the others are logged as ignored
and listed in ``SimConfig.ignored_flags``. An option vLLM does not know is an error, as in vLLM.
``VLLM_API_KEY`` stands in for ``--api-key`` when the flag is absent, and ``--config FILE`` reads
options from a YAML mapping, both as vLLM does. Flags that only the simulator has (latency model,
faults, policy) come after them in ``--help``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import structlog
import yaml
from pydantic import ValidationError

from ._vllm_flags import ALIASES, BOOL_FLAGS, LIST_FLAGS, OPTIONAL_FLAGS, VALUE_FLAGS, VLLM_VERSION
from .config import FaultRates, LatencyModel, SimConfig
from .policy import Policy
from .server import SimulatedVLLM

__all__ = ("build_parser", "config_from_args", "human_readable_int", "serve", "split_vllm_flags")

log = structlog.get_logger(__name__)

_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_NUMBER = re.compile(r"-\d+(?:\.\d+)?")


def human_readable_int(value: str) -> int:
    """``8192``, ``32k`` (32000) or ``32K`` (32768), as vLLM parses token counts."""
    value = value.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT])", value)
    if not match:
        return int(value)
    number, suffix = match.groups()
    if suffix in _DECIMAL:
        return int(float(number) * _DECIMAL[suffix])
    return int(number) * _BINARY[suffix]


def _max_model_len(value: str) -> int | None:
    """``--max-model-len``: a count, or ``auto``/``-1`` (the model's own length: here the default)."""
    if value.strip().lower() == "auto" or value.strip() == "-1":
        return None
    return human_readable_int(value)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for the options the simulator models; flag names follow ``vllm serve``."""
    p = argparse.ArgumentParser(prog="orchestrator sim-llm",
                                description=f"Serve a simulated vLLM {VLLM_VERSION} (scripted answers). Every other "
                                            "`vllm serve` option is accepted and ignored.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("model", nargs="?", default=None,
                   help="the model, as `vllm serve MODEL` takes it; the served name unless --served-model-name")
    p.add_argument("--model", dest="model_flag", default=None, help="the model, as a flag")
    p.add_argument("--served-model-name", nargs="+", default=None, help="default: MODEL, else sim-model")
    p.add_argument("--api-key", nargs="+", action="extend", default=[],
                   help="guards /v1 like vLLM; default: $VLLM_API_KEY")
    p.add_argument("--root-path", default="", help="path prefix of a proxy in front (the bare paths work too)")
    p.add_argument("--max-model-len", type=_max_model_len, default=None)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=human_readable_int, default=8192)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--enable-prompt-tokens-details", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--enable-force-include-usage", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--enable-request-id-headers", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--enable-auto-tool-choice", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--enable-tokenizer-info-endpoint", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--max-logprobs", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    sim = p.add_argument_group("simulator only")
    sim.add_argument("--kv-cache-tokens", type=human_readable_int, default=262144)
    sim.add_argument("--vocab-size", type=int, default=151936)
    sim.add_argument("--time-scale", type=float, default=1.0, help="real seconds per simulated second")
    sim.add_argument("--step-overhead", type=float, default=0.010, help="seconds per engine step")
    sim.add_argument("--decode-per-seq", type=float, default=0.00008, help="seconds per decoding sequence per step")
    sim.add_argument("--prefill-per-token", type=float, default=0.00025, help="seconds per uncached prompt token")
    sim.add_argument("--jitter", type=float, default=0.0)
    sim.add_argument("--fault-5xx", type=float, default=0.0, help="rate of HTTP 500 answers")
    sim.add_argument("--fault-hang", type=float, default=0.0, help="rate of requests that never answer")
    sim.add_argument("--fault-malformed", type=float, default=0.0)
    sim.add_argument("--fault-mid-stream", type=float, default=0.0)
    sim.add_argument("--policy", default=None, help="module:attr of a Policy (a class is instantiated)")
    sim.add_argument("--sim-admin", action="store_true",
                     help="serve GET /_sim/state and POST /_sim/faults (for tests; behind the API key when one is set)")
    sim.add_argument("--idle-timeout-s", type=float, default=None,
                     help="close keep-alive connections idle this long; default $VLLM_HTTP_TIMEOUT_KEEP_ALIVE, else 5")
    sim.add_argument("--request-timeout-s", type=float, default=30.0,
                     help="a request's head and body must arrive within this (slow clients are dropped)")
    return p


def _vllm_name(flag: str) -> str:
    """The canonical vLLM option a command-line flag names (aliases, underscores, ``--x.y`` sub-keys)."""
    name = flag.split("=", 1)[0]
    if name.startswith("--"):
        name = "--" + name[2:].replace("_", "-").split(".", 1)[0]
    return ALIASES.get(name, name)


def split_vllm_flags(argv: Sequence[str], ours: set[str]) -> tuple[list[str], list[str]]:
    """Split ``argv`` into what the simulator's parser reads and the vLLM options it ignores.

    A vLLM option takes its values the way vLLM's parser would (none for a boolean, one, or one
    or more), so ``--enforce-eager MODEL`` leaves ``MODEL`` as the positional model.
    """
    keep: list[str] = []
    ignored: list[str] = []
    args = list(argv)
    i = 0
    while i < len(args):
        token = args[i]
        i += 1
        if not token.startswith("-") or token == "-" or _NUMBER.fullmatch(token):
            keep.append(token)
            continue
        if token == "--":
            keep.extend(args[i - 1 :])
            break
        name = _vllm_name(token)
        if token.startswith("--") and "_" in token.split("=", 1)[0]:
            token = "--" + token[2:].split("=", 1)[0].replace("_", "-") + (
                "=" + token.split("=", 1)[1] if "=" in token else "")
        if name in ours and "." not in token.split("=", 1)[0]:
            keep.append(token)
            continue
        if re.fullmatch(r"-O(\.?\w+)?", token.split("=", 1)[0]) and token != "-O":
            ignored.append(token)  # -O3, -O.mode=...: compilation options
            continue
        negated = name.startswith("--no-") and "--" + name[5:] in BOOL_FLAGS
        inline = "=" in token
        if name in BOOL_FLAGS or negated:
            ignored.append(token)
        elif name in VALUE_FLAGS or token.split("=", 1)[0] == "-O":
            taken = [] if inline else args[i : i + 1]
            if not inline and (not taken or (taken[0].startswith("--"))):
                raise SystemExit(f"orchestrator sim-llm: error: argument {token}: expected one argument")
            ignored.extend([token, *taken])
            i += len(taken)
        elif name in LIST_FLAGS:
            values: list[str] = []
            while not inline and i < len(args) and (not args[i].startswith("-") or _NUMBER.fullmatch(args[i])):
                values.append(args[i])
                i += 1
            if not inline and not values:
                raise SystemExit(f"orchestrator sim-llm: error: argument {token}: expected at least one argument")
            ignored.extend([token, *values])
        elif name in OPTIONAL_FLAGS:
            ignored.append(token)
            if not inline and i < len(args) and not args[i].startswith("-"):
                ignored.append(args[i])
                i += 1
        else:
            keep.append(token)  # unknown to vLLM too: the parser reports it, as vLLM would
    return keep, ignored


def _config_file_args(path: str) -> list[str]:
    """``--config FILE``: a YAML mapping of option names to values, turned into flags (vLLM's rule)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SystemExit(f"orchestrator sim-llm: error: --config {path!r}: {exc}") from exc
    if not isinstance(data, dict):
        raise SystemExit(f"orchestrator sim-llm: error: --config {path!r} is not a mapping")
    out: list[str] = []
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False:
            if flag in BOOL_FLAGS:
                out.append("--no-" + flag[2:])
        elif isinstance(value, list):
            out += [flag, *(str(v) for v in value)]
        elif isinstance(value, dict):
            out += [flag, yaml.safe_dump(value, default_flow_style=True).strip()]
        else:
            out += [flag, str(value)]
    return out


def _expand_config(argv: list[str]) -> list[str]:
    for i, token in enumerate(argv):
        if token == "--config" and i + 1 < len(argv):
            return _config_file_args(argv[i + 1]) + argv[:i] + argv[i + 2 :]
        if token.startswith("--config="):
            return _config_file_args(token.split("=", 1)[1]) + argv[:i] + argv[i + 1 :]
    return argv


def _load_policy(spec: str) -> Policy:
    module, _, attr = spec.partition(":")
    obj = getattr(importlib.import_module(module), attr)
    policy = obj() if isinstance(obj, type) else obj
    if not callable(policy):
        raise SystemExit(f"--policy {spec!r} is not callable")
    return policy  # type: ignore[no-any-return]  # checked callable above


def config_from_args(argv: Sequence[str], env: dict[str, str] | None = None) -> tuple[SimConfig, argparse.Namespace]:
    """Parse a ``vllm serve``-style command line into the simulator's config (and the parsed flags)."""
    env = dict(os.environ) if env is None else env
    args_in = list(argv)
    if args_in and args_in[0] == "serve":  # `python -m orchestrator.simulator serve MODEL ...` stands in for vllm
        args_in = args_in[1:]
    args_in = _expand_config(args_in)
    parser = build_parser()
    ours = {s for action in parser._actions for s in action.option_strings}  # argparse has no public list
    keep, ignored = split_vllm_flags(args_in, ours)
    args = parser.parse_args(keep)
    if ignored:
        log.info("sim_flags_ignored", flags=ignored, reason="accepted like vllm serve; the simulator does not model them")
    model = args.model_flag or args.model
    served = args.served_model_name or [model or "sim-model"]
    api_keys = [k for k in args.api_key if k] or ([env["VLLM_API_KEY"]] if env.get("VLLM_API_KEY") else [])
    extra: dict[str, Any] = {}
    if args.max_model_len is not None:
        extra["max_model_len"] = args.max_model_len
    try:
        config = _config(args, served, api_keys, ignored, env, extra)
    except ValidationError as exc:
        errors = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        parser.error(errors)  # exits 2 naming the setting, as for any other bad option
    except ValueError as exc:
        parser.error(str(exc))
    return config, args


def _config(args: argparse.Namespace, served: list[str], api_keys: list[str], ignored: list[str],
            env: dict[str, str], extra: dict[str, Any]) -> SimConfig:
    return SimConfig(
        served_model_names=tuple(served), api_keys=tuple(api_keys), host=args.host,
        port=args.port, max_num_seqs=args.max_num_seqs, root_path=args.root_path,
        max_num_batched_tokens=args.max_num_batched_tokens, kv_cache_tokens=args.kv_cache_tokens,
        block_size=args.block_size, enable_prefix_caching=args.enable_prefix_caching,
        enable_prompt_tokens_details=args.enable_prompt_tokens_details,
        enable_force_include_usage=args.enable_force_include_usage,
        enable_request_id_headers=args.enable_request_id_headers,
        enable_auto_tool_choice=args.enable_auto_tool_choice, max_logprobs=args.max_logprobs,
        enable_tokenizer_info_endpoint=args.enable_tokenizer_info_endpoint,
        vocab_size=args.vocab_size, time_scale=args.time_scale, ignored_flags=tuple(ignored),
        latency=LatencyModel(step_overhead_s=args.step_overhead, decode_s_per_seq=args.decode_per_seq,
                             prefill_s_per_token=args.prefill_per_token, jitter=args.jitter),
        faults=FaultRates(server_error=args.fault_5xx, hang=args.fault_hang, malformed=args.fault_malformed,
                          mid_stream_error=args.fault_mid_stream),
        seed=args.seed, sim_admin=args.sim_admin,
        server_dev_mode=env.get("VLLM_SERVER_DEV_MODE", "0").strip().lower() in ("1", "true"), idle_timeout_s=_idle_timeout(args.idle_timeout_s, env),
        request_timeout_s=args.request_timeout_s, **extra,
    )


def _idle_timeout(flag: float | None, env: dict[str, str]) -> float:
    """``--idle-timeout-s``, else vLLM's ``VLLM_HTTP_TIMEOUT_KEEP_ALIVE``, else uvicorn's 5 s."""
    if flag is not None:
        return flag
    raw = env.get("VLLM_HTTP_TIMEOUT_KEEP_ALIVE")
    try:
        return float(raw) if raw else 5.0
    except ValueError:
        raise ValueError(f"VLLM_HTTP_TIMEOUT_KEEP_ALIVE={raw!r} is not a number") from None


def serve(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` and serve until interrupted; returns an exit status."""
    config, args = config_from_args(list(sys.argv[1:] if argv is None else argv))
    sim = SimulatedVLLM(config, policy=_load_policy(args.policy) if args.policy else None)
    try:
        anyio.run(sim.serve_forever)
    except KeyboardInterrupt:
        return 0
    return 0
