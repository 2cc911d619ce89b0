"""The command lines a local fleet runs: ``vllm serve``, the manager and each worker replica.

Pure functions of the manifest, so tests check them without starting anything. Secrets (the
Redis URL, the LLM API key) travel in the environment, never on a command line that ``ps`` shows.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from orchestrator.fleet.keys import KeyShares
from orchestrator.fleet.manifest import FleetManifest, ServeSpec, UISpec, WorkerSpec

__all__ = ("ProcessSpec", "child_env", "manager_command", "process_specs", "ui_command", "vllm_command",
           "worker_command")

Role = Literal["llm", "manager", "worker", "ui"]


@dataclass(frozen=True)
class ProcessSpec:
    """One supervised process: its display name (log prefix), role, capability and argv."""

    name: str
    role: Role
    argv: tuple[str, ...]
    capability: str = ""
    env: Mapping[str, str] = field(default_factory=dict)


def vllm_command(serve: ServeSpec, *, served_model_name: str | None = None) -> list[str]:
    """``vllm serve MODEL --host H --port P [--served-model-name N] [--tensor-parallel-size G] ARGS...``.

    ``serve.command`` is the binary (``vllm`` unless the manifest or ``ORCH_VLLM_BINARY`` says
    otherwise). A command starting with ``orchestrator`` runs this installation's CLI, so
    ``[orchestrator, sim-llm]`` serves the built-in simulator whether or not ``orchestrator`` is on PATH.
    """
    command = list(serve.command)
    if command[0] == "orchestrator":
        command = [*_cli_binary(), *command[1:]]
    argv = [*command, "serve", serve.model, "--host", serve.host, "--port", str(serve.port)]
    if served_model_name and served_model_name != serve.model:
        argv += ["--served-model-name", served_model_name]
    if serve.gpus > 1 and "--tensor-parallel-size" not in serve.args and "-tp" not in serve.args:
        argv += ["--tensor-parallel-size", str(serve.gpus)]
    return [*argv, *serve.args]


def _cli_binary() -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli"]


def _cli(log_level: str) -> list[str]:
    return [*_cli_binary(), "--log-level", log_level]


def _llm_flags(manifest: FleetManifest) -> list[str]:
    flags: list[str] = []
    if manifest.llm_url:
        flags += ["--llm-url", manifest.llm_url]
        if manifest.llm_model:
            flags += ["--model", manifest.llm_model]
    return flags


def _bus_flags(manifest: FleetManifest) -> list[str]:
    return ["--namespace", manifest.spec.namespace, "--lease-s", f"{manifest.spec.lease_seconds:g}"]


def manager_command(manifest: FleetManifest, *, log_level: str = "INFO") -> list[str]:
    """``orchestrator manager`` for this fleet (Redis URL from ``ORCH_REDIS_URL`` in the environment)."""
    spec = manifest.spec
    return [*_cli(log_level), "manager", *_bus_flags(manifest), "--ledger", spec.ledger.path,
            "--name", f"{manifest.name}-manager", "--manager-lease-s", f"{spec.manager.lease_seconds:g}",
            *spec.manager.flags(), *_llm_flags(manifest)]


def worker_command(manifest: FleetManifest, worker: WorkerSpec, index: int, *, log_level: str = "INFO") -> list[str]:
    """``orchestrator worker`` for replica ``index`` of ``worker``, consumer name ``FLEET-CAPABILITY-i``."""
    drain_s = max(manifest.spec.supervisor.grace_period_seconds * 2 / 3, 0.5)
    return [*_cli(log_level), "worker", *_bus_flags(manifest), "--capability", worker.capability,
            "--plugin", worker.plugin_ref, "--concurrency", str(worker.concurrency),
            "--config", json.dumps(worker.config, separators=(",", ":")),
            "--name", f"{manifest.name}-{worker.capability}-{index}", "--drain-s", f"{drain_s:g}",
            *_llm_flags(manifest)]


def ui_command(ui: UISpec, *, operator: str | None = None, log_level: str = "INFO") -> list[str]:
    """``orchestrator ui --host H --port P [--operator NAME]`` (Redis URL and namespace from the environment).

    ``operator`` (``operator:NAME``) lets people who log in act as that key; without it the page is read-only.
    """
    argv = [*_cli(log_level), "ui", "--host", ui.host, "--port", str(ui.port)]
    if operator:
        argv += ["--operator", operator.removeprefix("operator:")]
    return argv


def child_env(manifest: FleetManifest, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every child: ours, plus the fleet's Redis URL, namespace and API key."""
    env = dict(os.environ if environ is None else environ)
    env["ORCH_REDIS_URL"] = manifest.spec.redis.url
    env["ORCH_NAMESPACE"] = manifest.spec.namespace
    env["PYTHONUNBUFFERED"] = "1"
    key = manifest.api_key(environ)
    if key:
        env["ORCH_LLM_API_KEY"] = key
        env["VLLM_API_KEY"] = key  # what `vllm serve` reads instead of --api-key
    return env


def _with_keys(env: Mapping[str, str], keys: KeyShares | None, role: Role, capability: str = "") -> dict[str, str]:
    """``env`` with ``ORCH_KEYS`` set to the process's own share (and removed where it has none)."""
    out = dict(env)
    if keys is None:
        return out  # unsigned (--insecure), or keys the caller arranged through the environment
    share = keys.for_process(role, capability)
    if share is None:
        out.pop("ORCH_KEYS", None)
    else:
        out["ORCH_KEYS"] = str(share)
    return out


def process_specs(manifest: FleetManifest, environ: Mapping[str, str] | None = None, *,
                  log_level: str = "INFO", keys: KeyShares | None = None) -> list[ProcessSpec]:
    """Every process of the fleet in start order: vLLM (when served), the manager, each worker replica, the console."""
    env = child_env(manifest, environ)
    specs: list[ProcessSpec] = []
    serve = manifest.spec.llm.serve
    if serve is not None:
        specs.append(ProcessSpec("vllm", "llm", tuple(vllm_command(serve, served_model_name=manifest.llm_model)),
                                 env=_with_keys(env, keys, "llm")))
    specs.append(ProcessSpec("manager", "manager", tuple(manager_command(manifest, log_level=log_level)),
                             env=_with_keys(env, keys, "manager")))
    for worker in manifest.spec.workers:
        for i in range(worker.replicas):
            specs.append(ProcessSpec(f"worker-{worker.capability}-{i}", "worker",
                                     tuple(worker_command(manifest, worker, i, log_level=log_level)),
                                     capability=worker.capability,
                                     env=_with_keys(env, keys, "worker", worker.capability)))
    if manifest.ui is not None:
        operator = keys.console if keys is not None else None
        specs.append(ProcessSpec("ui", "ui", tuple(ui_command(manifest.ui, operator=operator, log_level=log_level)),
                                 env=_with_keys(env, keys, "ui")))
    return specs
