"""The built-in ``python`` worker: run the task's Python snippet in a sandboxed process and return its ``result``."""

from __future__ import annotations

import concurrent.futures
import math
import os
import sys
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import anyio
from pydantic import BaseModel, ConfigDict, Field

from protocol.errors import ConfigError
from workers.base import Task, Worker, WorkerContext
from workers.builtin._sandbox import SandboxError, SandboxLimits, SandboxResult, run_snippet

__all__ = ("PythonConfig", "PythonWorker", "SandboxError", "TimeLimit")


class PythonConfig(BaseModel):
    """Limits of the ``python`` worker's sandbox (see ``docs/sandbox.md``).

    ``timeout_s`` is the wall-clock limit when the task gives none; a task's ``timeout_s`` (or its
    ``config: {timeout_s: ...}``) replaces it, up to ``max_timeout_s``. ``cpu_s`` defaults to the
    wall-clock limit; ``max_processes`` is off by default because RLIMIT_NPROC counts every
    process of the user the snippets run as.

    ``sandbox_user`` is the account a root worker runs snippets as (default ``nobody``).
    ``allow_network_without_namespace`` lets the worker start, and run snippets *with network
    access*, where no empty network namespace can be had (or ``net_namespace`` is off); without
    it such a worker refuses to start.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    timeout_s: float = Field(default=10.0, gt=0)
    max_timeout_s: float = Field(default=300.0, gt=0)
    memory_mb: int | None = Field(default=256, ge=16)
    cpu_s: float | None = Field(default=None, gt=0)
    max_file_mb: int | None = Field(default=16, ge=0)
    max_processes: int | None = Field(default=None, ge=1)
    max_open_files: int | None = Field(default=256, ge=16)
    max_output_bytes: int = Field(default=64 * 1024, ge=0)
    max_result_bytes: int = Field(default=4 * 1024 * 1024, ge=16)
    net_namespace: bool = True
    allow_network_without_namespace: bool = False
    sandbox_user: str | None = None
    python: str = sys.executable
    env: dict[str, str] = {}

    def limits(self, *, wall_s: float | None = None) -> SandboxLimits:
        """The sandbox limits this config describes, with ``wall_s`` in place of ``timeout_s`` when given."""
        wall_s = self.timeout_s if wall_s is None else wall_s
        return SandboxLimits(
            wall_s=wall_s, cpu_s=self.cpu_s if self.cpu_s is not None else wall_s,
            memory_mb=self.memory_mb, max_file_mb=self.max_file_mb, max_processes=self.max_processes,
            max_open_files=self.max_open_files, max_output_bytes=self.max_output_bytes,
            max_result_bytes=self.max_result_bytes, net_namespace=self.net_namespace,
            require_net_namespace=not self.allow_network_without_namespace, sandbox_user=self.sandbox_user,
            python=self.python, extra_env=dict(self.env),
        )


class PythonWorker(Worker):
    """Run a Python snippet in a separate, resource-limited process.

    The code is ``task.input["code"]`` when the input is a dict with a ``"code"`` key (the snippet
    then sees ``input.get("args")`` as ``task_input``), else ``task.instruction`` (and ``task_input``
    is the whole input). The snippet also sees ``deps`` (dependency outputs by task id),
    ``feedback`` and ``corrections`` (lists of strings from earlier failed verifications) and
    ``attempt``. The output is what the snippet assigns to ``result``, or its stripped stdout when it
    assigns nothing. Any failure raises ``SandboxError`` with a one-line reason.

    The wall-clock limit is, most specific first: the task's ``config: {timeout_s: ...}``, the
    task's ``timeout_s``, this worker's ``timeout_s``; never more than its ``max_timeout_s``. A
    task's config may not set ``max_timeout_s``, ``python``, ``env``, ``net_namespace``,
    ``allow_network_without_namespace`` or ``sandbox_user``.

    On construction the worker runs one empty snippet and measures its sandbox: it refuses to
    start (``ConfigError``, naming what is missing) when a root worker cannot drop to
    ``sandbox_user`` or no network namespace can be had and the config does not allow that, and
    logs ``sandbox_checked`` with the protections it measured.
    """

    capability = "python"
    config_model: ClassVar[type[BaseModel]] = PythonConfig
    task_config_locked: ClassVar[frozenset[str]] = frozenset({
        "max_timeout_s", "python", "env", "net_namespace", "allow_network_without_namespace", "sandbox_user"})

    def __init__(self, config: BaseModel | dict[str, Any] | None = None, *,
                 context: WorkerContext | None = None) -> None:
        super().__init__(config, context=context)
        assert isinstance(self.config, PythonConfig)
        self.sandbox_protections = check_sandbox(self.config)
        self.context.logger.info("sandbox_checked", protections=list(self.sandbox_protections), uid=os.geteuid())
        if "net_namespace" not in self.sandbox_protections:
            self.context.logger.warning(
                "sandbox_without_network_namespace", allow_network_without_namespace=True,
                detail="snippets run WITH network access: no empty network namespace could be had here")

    async def handle(self, task: Task) -> Any:
        """Run the task's snippet and return its ``result`` (or its stdout)."""
        config = self.config_for(task)
        assert isinstance(config, PythonConfig)  # validated with config_model by Worker.__init__ or task_config
        limit = self.time_limit(task, config)
        if isinstance(task.input, dict) and "code" in task.input:
            code, task_input = task.input["code"], task.input.get("args")
            if not isinstance(code, str):
                raise SandboxError(f"input 'code' must be a string, not {type(code).__name__}")
        else:
            code, task_input = task.instruction, task.input
        outcome = await run_snippet(code, limits=config.limits(wall_s=limit.wall_s), globals_in={
            "task_input": task_input, "deps": dict(task.dependencies), "feedback": list(task.feedback),
            "corrections": list(task.corrections), "attempt": task.attempt,
        })
        self.context.logger.info(
            "snippet_finished", ok=outcome.ok, duration_s=round(outcome.duration_s, 3),
            killed_by=outcome.killed_by, protections=list(outcome.protections), measured=outcome.measured,
        )
        if not outcome.ok:
            raise SandboxError(_failure_text(outcome, config, limit), result=outcome)
        if outcome.has_result:
            return outcome.value
        return outcome.stdout.strip()

    def time_limit(self, task: Task, config: PythonConfig) -> TimeLimit:
        """The sandbox's wall-clock limit for ``task``: what was asked for, capped at ``max_timeout_s``."""
        if "timeout_s" in task.config_overrides:
            requested, source = config.timeout_s, "the task's config timeout_s"
        elif task.timeout_s:
            requested, source = task.timeout_s, "the task's timeout_s"
        else:
            requested, source = config.timeout_s, "the worker's timeout_s"
        maximum = config.max_timeout_s
        limit = TimeLimit(wall_s=min(requested, maximum), requested_s=requested, source=source, max_s=maximum)
        if limit.clamped:
            self.context.logger.warning("time_limit_clamped", requested_s=requested, source=source,
                                        max_timeout_s=maximum)
        return limit


_checked: dict[tuple[Any, ...], tuple[str, ...] | str] = {}


def check_sandbox(config: PythonConfig) -> tuple[str, ...]:
    """Run an empty snippet with ``config``'s sandbox and return the protections measured on it.

    Raises ``ConfigError`` naming what is missing when the sandbox refuses to run (see
    ``required_protections``). Remembered per process for each interpreter, user and namespace
    setting, so a worker built per task does not pay for it again.
    """
    limits = replace(config.limits(wall_s=30), cpu_s=30, memory_mb=None)
    key = (os.geteuid(), limits.python, limits.sandbox_user, limits.net_namespace, limits.require_net_namespace)
    if key not in _checked:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # works inside and outside an event loop
            try:
                outcome = pool.submit(anyio.run, _empty_snippet, limits).result()
            except SandboxError as exc:
                reason = exc.result.error if exc.result is not None and exc.result.error else str(exc)
                _checked[key] = f"the python worker refuses to start: {reason}"
            else:
                if not outcome.ok:
                    _checked[key] = (f"the python worker refuses to start: its sandbox cannot run a snippet here "
                                     f"(can the snippet's user read {limits.python}'s standard library?): "
                                     f"{outcome.error}")
                else:
                    _checked[key] = outcome.protections
    checked = _checked[key]
    if isinstance(checked, str):
        raise ConfigError(checked)
    return checked


# Snippets import from the standard library after dropping privileges: its directory must be readable.
_PROBE = "import os\nos.listdir(os.path.dirname(os.__file__))\nresult = None"


async def _empty_snippet(limits: SandboxLimits) -> SandboxResult:
    return await run_snippet(_PROBE, globals_in={}, limits=limits)


@dataclass(frozen=True, slots=True)
class TimeLimit:
    """A snippet's wall-clock limit, and where it came from (``source``: which setting asked for it)."""

    wall_s: float
    requested_s: float
    source: str
    max_s: float

    @property
    def clamped(self) -> bool:
        """Whether ``max_timeout_s`` cut the requested limit down."""
        return self.requested_s > self.max_s


def _failure_text(outcome: SandboxResult, config: PythonConfig, limit: TimeLimit) -> str:
    if outcome.killed_by == "wall clock":
        text = f"snippet ran past its {limit.wall_s:g} s time limit"
        if limit.clamped:
            text += (f" ({limit.source} asked for {limit.requested_s:g} s; this worker allows at most "
                     f"max_timeout_s={limit.max_s:g})")
        return text
    if outcome.killed_by == "memory":
        return f"snippet exceeded its {config.memory_mb} MiB memory limit"
    if outcome.killed_by == "cpu":
        cpu_s = config.cpu_s if config.cpu_s is not None else limit.wall_s
        return f"snippet used up its {math.ceil(cpu_s)} s CPU-time limit"
    if outcome.killed_by == "file size":
        return f"snippet exceeded its {config.max_file_mb} MiB file size limit"
    error = outcome.error or "failed without an error message"
    if error.startswith(("result ", "killed ", "the sandbox ", "ran past", "used up", "crashed")):
        return f"snippet {error}" if not error.startswith("the sandbox ") else error
    return f"snippet raised {error}"
