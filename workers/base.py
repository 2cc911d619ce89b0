"""What a worker plugin is: a class with a capability, an optional config model and ``handle``."""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import structlog
from pydantic import AliasChoices, BaseModel, ConfigDict, SerializeAsAny, ValidationError

from protocol.errors import ConfigError
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

    ``config`` is the worker's own config with the task's ``config:`` merged over it, an instance
    of the worker's ``config_model`` (the runtime always sets it; ``None`` only in a Task built by
    hand, see ``Worker.config_for``). ``config_overrides`` holds the keys the task's ``config:``
    gave, as given. ``timeout_s`` is the task's own time limit per attempt, ``None`` when the job
    gave none.
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
    config: SerializeAsAny[BaseModel] | None = None  # dumped with its own fields, not the base's (none)
    config_overrides: dict[str, Any] = {}
    timeout_s: float | None = None

    @classmethod
    def from_assign(cls, body: Assign | VerifyRequest, *, run_id: str, task_id: str, attempt: int,
                    config: BaseModel | None = None) -> Task:
        """Build the worker's view of an assign (or verify) message; ``config`` is the merged config."""
        if isinstance(body, VerifyRequest):
            return cls(run_id=run_id, task_id=task_id, attempt=attempt, capability=body.capability,
                       instruction=body.instruction, input=body.input, spec_description=body.spec_description,
                       config=config, config_overrides=dict(body.config), timeout_s=body.timeout_s)
        last = body.redo[-1] if body.redo else None
        return cls(
            run_id=run_id, task_id=task_id, attempt=attempt, capability=body.capability,
            instruction=body.instruction, input=body.input,
            feedback=tuple(r.feedback for r in body.redo if r.feedback),
            corrections=tuple(c for r in body.redo for c in r.corrections),
            plan=last.plan if last else "", context=last.context if last else "",
            spec_description=body.spec_description, dependencies=body.dependencies,
            config=config, config_overrides=dict(body.config), timeout_s=body.timeout_s,
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
    optionally ``config_model`` (a pydantic model validated from the manifest, and from each
    task's ``config:`` merged over it), implements ``handle`` and, when it can check its own
    results, ``verify``. Either may be ``async def`` (it runs on the event loop and must not
    block it) or a plain ``def`` (the runtime runs it in a worker thread).

    ``task_config_locked`` names config keys only the worker's own config may set (a task's
    ``config:`` that sets one fails), e.g. limits that protect the host.
    """

    capability: ClassVar[str]
    config_model: ClassVar[type[BaseModel]] = NoConfig
    task_config_locked: ClassVar[frozenset[str]] = frozenset()
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
    def handle(self, task: Task) -> Any:
        """Do the task and return its output (a JSON-like value); ``async def`` or plain ``def``."""

    def verify(self, task: Task, output: Any) -> Verdict | bool | Awaitable[Verdict | bool]:
        """Check an output against the task; override to give the manager a worker-side check.

        Return a ``Verdict`` or a bool (``async def`` or plain ``def``); a verdict with no
        ``verifier`` is attributed to ``worker:<capability>``.
        """
        raise NotImplementedError

    def config_for(self, task: Task) -> Any:
        """The config this task runs with: ``task.config``, or the worker's own when the task carries none.

        Typed ``Any`` like a subclass's ``config``: annotate it, ``config: MyConfig = self.config_for(task)``.
        """
        return task.config if task.config is not None else self.config

    def task_config(self, overrides: Mapping[str, Any]) -> BaseModel:
        """This worker's config with a task's ``config:`` merged over it, validated by ``config_model``.

        Raises ``ConfigError`` naming the capability and the keys when the task sets a key the
        model does not define (unless the model allows extra keys) or a locked key, and the
        field when a value is invalid.
        """
        if not overrides:
            return self.config
        model = self.config_model
        where = f"task config for capability {self.capability!r}"
        locked = sorted(key for key in overrides if key in self.task_config_locked)
        if locked:
            raise ConfigError(f"{where} sets {_keys(locked)}, which only the worker's own config may set")
        if model.model_config.get("extra") != "allow":
            known = _accepted_keys(model)
            unknown = sorted(key for key in overrides if key not in known)
            if unknown:
                raise ConfigError(f"{where} has unknown {'key' if len(unknown) == 1 else 'keys'} {_keys(unknown)} "
                                  f"({model.__name__} takes {', '.join(sorted(model.model_fields)) or 'no keys'})")
        base = self.config.model_dump(by_alias=True, exclude_unset=True)
        try:
            return model.model_validate({**base, **overrides})
        except ValidationError as exc:
            problems = "; ".join(f"field {'.'.join(map(str, e['loc'])) or '(root)'!r}: {e['msg']}"
                                 for e in exc.errors(include_url=False))
            raise ConfigError(f"{where} is invalid: {problems}") from exc

    @classmethod
    def has_own_verify(cls) -> bool:
        """Whether this worker overrides ``verify`` (the manager then asks it to check results)."""
        return cls.verify is not Worker.verify


def _keys(keys: list[str]) -> str:
    return ", ".join(map(repr, keys))


def _accepted_keys(model: type[BaseModel]) -> set[str]:
    """Every key ``model`` validates a field from: names, aliases and validation aliases."""
    keys: set[str] = set()
    for name, info in model.model_fields.items():
        keys.add(name)
        if isinstance(info.alias, str):
            keys.add(info.alias)
        aliases = info.validation_alias
        choices = aliases.choices if isinstance(aliases, AliasChoices) else [aliases]
        keys.update(choice for choice in choices if isinstance(choice, str))
    return keys


def _defines_handle(cls: type) -> bool:
    # ABCMeta fills __abstractmethods__ only after __init_subclass__ runs, so look at the MRO instead:
    # an intermediate base class that does not implement handle yet needs no capability.
    return any("handle" in vars(klass) for klass in cls.__mro__ if klass is not Worker)
