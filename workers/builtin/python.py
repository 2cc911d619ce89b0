"""The built-in ``python`` worker: run the task's Python snippet in a sandboxed process and return its ``result``."""

from __future__ import annotations

import math
import sys
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from workers.base import Task, Worker
from workers.builtin._sandbox import SandboxError, SandboxLimits, SandboxResult, run_snippet

__all__ = ("PythonConfig", "PythonWorker", "SandboxError")


class PythonConfig(BaseModel):
    """Limits of the ``python`` worker's sandbox (see ``docs/sandbox.md``).

    ``cpu_s`` defaults to ``timeout_s``; ``max_processes`` is off by default because RLIMIT_NPROC
    counts every process of the user the worker runs as (and root ignores it).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    timeout_s: float = Field(default=10.0, gt=0)
    memory_mb: int | None = Field(default=256, ge=16)
    cpu_s: float | None = Field(default=None, gt=0)
    max_file_mb: int | None = Field(default=16, ge=0)
    max_processes: int | None = Field(default=None, ge=1)
    max_open_files: int | None = Field(default=256, ge=16)
    max_output_bytes: int = Field(default=64 * 1024, ge=0)
    max_result_bytes: int = Field(default=4 * 1024 * 1024, ge=16)
    net_namespace: bool = True
    python: str = sys.executable
    env: dict[str, str] = {}

    def limits(self) -> SandboxLimits:
        """The sandbox limits this config describes."""
        return SandboxLimits(
            wall_s=self.timeout_s, cpu_s=self.cpu_s if self.cpu_s is not None else self.timeout_s,
            memory_mb=self.memory_mb, max_file_mb=self.max_file_mb, max_processes=self.max_processes,
            max_open_files=self.max_open_files, max_output_bytes=self.max_output_bytes,
            max_result_bytes=self.max_result_bytes, net_namespace=self.net_namespace, python=self.python,
            extra_env=dict(self.env),
        )


class PythonWorker(Worker):
    """Run a Python snippet in a separate, resource-limited process.

    The code is ``task.input["code"]`` when the input is a dict with a ``"code"`` key (the snippet
    then sees ``input.get("args")`` as ``task_input``), else ``task.instruction`` (and ``task_input``
    is the whole input). The snippet also sees ``deps`` (dependency outputs by task id),
    ``feedback`` and ``corrections`` (lists of strings from earlier failed verifications) and
    ``attempt``. The output is what the snippet assigns to ``result``, or its stripped stdout when it
    assigns nothing. Any failure raises ``SandboxError`` with a one-line reason.
    """

    capability = "python"
    config_model: ClassVar[type[BaseModel]] = PythonConfig

    async def handle(self, task: Task) -> Any:
        """Run the task's snippet and return its ``result`` (or its stdout)."""
        config = self.config
        assert isinstance(config, PythonConfig)  # Worker.__init__ validated it with config_model
        if isinstance(task.input, dict) and "code" in task.input:
            code, task_input = task.input["code"], task.input.get("args")
            if not isinstance(code, str):
                raise SandboxError(f"input 'code' must be a string, not {type(code).__name__}")
        else:
            code, task_input = task.instruction, task.input
        outcome = await run_snippet(code, limits=config.limits(), globals_in={
            "task_input": task_input, "deps": dict(task.dependencies), "feedback": list(task.feedback),
            "corrections": list(task.corrections), "attempt": task.attempt,
        })
        self.context.logger.info(
            "snippet_finished", ok=outcome.ok, duration_s=round(outcome.duration_s, 3),
            killed_by=outcome.killed_by, protections=list(outcome.protections),
        )
        if not outcome.ok:
            raise SandboxError(_failure_text(outcome, config), result=outcome)
        if outcome.has_result:
            return outcome.value
        return outcome.stdout.strip()


def _failure_text(outcome: SandboxResult, config: PythonConfig) -> str:
    if outcome.killed_by == "wall clock":
        return f"snippet ran past its {config.timeout_s:g} s time limit"
    if outcome.killed_by == "memory":
        return f"snippet exceeded its {config.memory_mb} MiB memory limit"
    if outcome.killed_by == "cpu":
        cpu_s = config.cpu_s if config.cpu_s is not None else config.timeout_s
        return f"snippet used up its {math.ceil(cpu_s)} s CPU-time limit"
    if outcome.killed_by == "file size":
        return f"snippet exceeded its {config.max_file_mb} MiB file size limit"
    error = outcome.error or "failed without an error message"
    if error.startswith(("result ", "killed ", "the sandbox ", "ran past", "used up", "crashed")):
        return f"snippet {error}" if not error.startswith("the sandbox ") else error
    return f"snippet raised {error}"
