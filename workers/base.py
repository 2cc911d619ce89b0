"""What a worker plugin is: a class with a capability, an optional config model and ``handle``."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import structlog
from pydantic import BaseModel, ConfigDict

from protocol.messages import Assign, Verdict, VerifyRequest

__all__ = ("NoConfig", "Task", "Verdict", "Worker", "WorkerContext")


class NoConfig(BaseModel):
    """The config model of a worker that takes none."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class Task(BaseModel):
    """The task as a worker sees it.

    ``feedback`` and ``corrections`` hold what earlier failed verifications said, oldest first;
    both are empty on attempt 1. ``dependencies`` maps each ``depends_on`` task id to its
    accepted output.
    """

    model_config = ConfigDict(frozen=True)

    run_id: str
    task_id: str
    attempt: int
    capability: str
    instruction: str
    input: Any = None
    feedback: tuple[str, ...] = ()
    corrections: tuple[str, ...] = ()
    plan: str = ""
    context: str = ""
    spec_description: str = ""
    dependencies: dict[str, Any] = {}

    @classmethod
    def from_assign(cls, body: Assign | VerifyRequest, *, run_id: str, task_id: str, attempt: int) -> Task:
        """Build the worker's view of an assign (or verify) message."""
        if isinstance(body, VerifyRequest):
            return cls(run_id=run_id, task_id=task_id, attempt=attempt, capability=body.capability,
                       instruction=body.instruction, input=body.input, spec_description=body.spec_description)
        last = body.redo[-1] if body.redo else None
        return cls(
            run_id=run_id, task_id=task_id, attempt=attempt, capability=body.capability,
            instruction=body.instruction, input=body.input,
            feedback=tuple(r.feedback for r in body.redo if r.feedback),
            corrections=tuple(c for r in body.redo for c in r.corrections),
            plan=last.plan if last else "", context=last.context if last else "",
            spec_description=body.spec_description, dependencies=body.dependencies,
        )


ProgressCallback = Callable[[str, float | None], Awaitable[None]]


async def _no_progress(message: str, fraction: float | None) -> None:
    return None


@dataclass(frozen=True, slots=True)
class WorkerContext:
    """What the runtime hands a worker: a logger bound to the worker, a progress reporter and shared clients.

    ``inference`` is the process's shared inference client when one is configured (``None`` otherwise).
    """

    name: str = "worker"
    logger: Any = field(default_factory=lambda: structlog.get_logger("workers"))
    progress: ProgressCallback = _no_progress
    inference: Any = None


class Worker(abc.ABC):
    """Base class of every worker plugin.

    A plugin sets ``capability`` (the name jobs route by; an entry point's name must match it),
    optionally ``config_model`` (a pydantic model validated from the manifest or job config),
    implements ``handle`` and, when it can check its own results, ``verify``.
    """

    capability: ClassVar[str]
    config_model: ClassVar[type[BaseModel]] = NoConfig
    # Set by workers that call the language model: hosts hand them the shared InferenceClient.
    needs_inference: ClassVar[bool] = False

    def __init__(self, config: BaseModel | dict[str, Any] | None = None, *,
                 context: WorkerContext | None = None) -> None:
        if isinstance(config, BaseModel):
            self.config = config
        else:
            self.config = self.config_model.model_validate(config or {})
        self.context = context or WorkerContext(name=self.capability)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if _defines_handle(cls) and not isinstance(getattr(cls, "capability", None), str):
            raise TypeError(f"worker class {cls.__qualname__!r} must set a string class attribute 'capability'")

    @abc.abstractmethod
    async def handle(self, task: Task) -> Any:
        """Do the task and return its output (a JSON-like value)."""

    async def verify(self, task: Task, output: Any) -> Verdict | bool:
        """Check an output against the task; override to give the manager a worker-side check."""
        raise NotImplementedError

    @classmethod
    def has_own_verify(cls) -> bool:
        """Whether this worker overrides ``verify`` (the manager then asks it to check results)."""
        return cls.verify is not Worker.verify


def _defines_handle(cls: type) -> bool:
    # ABCMeta fills __abstractmethods__ only after __init_subclass__ runs, so look at the MRO instead:
    # an intermediate base class that does not implement handle yet needs no capability.
    return any("handle" in vars(klass) for klass in cls.__mro__ if klass is not Worker)
