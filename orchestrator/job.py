"""Jobs: a goal and its tasks, from YAML files or Python objects, validated before anything runs."""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal
from weakref import WeakValueDictionary

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)
from pydantic_core import PydanticSerializationError

from orchestrator._checks import CheckRegistry, default_checks
from orchestrator.yaml_file import read_yaml
from protocol._compact import SharedFieldsSet
from protocol.errors import ConfigError, JobError
from protocol.limits import JOB_LIMITS, LimitExceeded, ShapeLimits, check_shape

__all__ = ("Budget", "Job", "Spec", "TaskDef", "load_job", "parse_job")

_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Spec(_Frozen):
    """What a result must satisfy. Checks run cheapest first; the first failure decides.

    - ``expect``: the output must equal this value.
    - ``schema``: the output must validate against this JSON schema.
    - ``check``: the name of a registered check (entry point group ``orchestrator.checks``, or allowed
      by the manager's configuration) taking ``(output, task)`` and returning a bool, a
      ``(passed, feedback)`` pair or a ``Verdict``. A job never imports code by naming it.
    - ``description``: what a good result is, in words, for an LLM judge or a person.
    - ``approval``: ``human`` holds the task in ``verify_done`` until a person approves it.
    """

    expect: Any = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    check: str | None = Field(default=None, pattern=r"^[\w.:-]+$", max_length=200)
    description: str = ""
    approval: Literal["auto", "human"] = "auto"

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    @model_serializer(mode="wrap")
    def _omit_unset_expect(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        # ``expect: null`` is a real check; an absent ``expect`` is none. Keep them apart through a dump.
        data: dict[str, Any] = handler(self)
        if "expect" not in self.model_fields_set:
            data.pop("expect", None)
        return data

    @property
    def has_expect(self) -> bool:
        """Whether ``expect`` was given (``null`` is a legitimate expected value)."""
        return "expect" in self.model_fields_set

    @field_validator("schema_")
    @classmethod
    def _schema_is_valid(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            import jsonschema

            try:
                _check_schema(value)
            except jsonschema.SchemaError as exc:
                raise ValueError(f"not a valid JSON schema: {exc.message}") from exc
        return value


def _check_schema(schema: dict[str, Any]) -> None:
    """Check ``schema`` against the metaschema, once per distinct schema of plain JSON data."""
    try:
        text = json.dumps(schema, sort_keys=True)
    except (TypeError, ValueError):
        text = None
    if text is None or json.loads(text) != schema:  # not plain JSON ({1: ...} dumps like {"1": ...}): uncached
        import jsonschema

        jsonschema.Draft202012Validator.check_schema(schema)
    else:
        _check_schema_text(text)


@functools.lru_cache(maxsize=1024)
def _check_schema_text(text: str) -> None:
    """Check a schema given as JSON once: a generated job gives thousands of tasks the same schema, and
    checking one against the metaschema costs ~0.15 ms. Only valid schemas are remembered (a raise is not)."""
    import jsonschema

    jsonschema.Draft202012Validator.check_schema(json.loads(text))


# One instance of each distinct spec among the tasks in memory: a generated job gives thousands of tasks
# the same spec, and each parsed copy was ~490 bytes a task. Specs are frozen, so sharing one is safe.
_SPECS: WeakValueDictionary[str, Spec] = WeakValueDictionary()


def shared_spec(spec: Spec) -> Spec:
    """The one instance in memory of specs equal to ``spec`` (``spec`` itself when it is the first)."""
    try:
        key = spec.model_dump_json(by_alias=True)  # tells an absent ``expect`` from ``expect: null``
    except PydanticSerializationError:  # not JSON data: the store will say so; nothing to share
        return spec
    known = _SPECS.setdefault(key, spec)
    return known if known == spec else spec  # JSON alike but not equal (a set and a list): keep both


class TaskDef(_Frozen, SharedFieldsSet):
    """One task of a job."""

    id: str = Field(pattern=_ID_PATTERN)
    capability: str = Field(min_length=1)
    instruction: str = ""
    input: Any = None
    depends_on: tuple[str, ...] = ()
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    max_tokens: int | None = Field(default=None, ge=1)
    timeout_s: float | None = Field(default=None, gt=0)
    config: dict[str, Any] = Field(default_factory=dict)
    spec: Spec = Field(default_factory=Spec)

    @field_validator("spec")
    @classmethod
    def _one_of_each_spec(cls, value: Spec) -> Spec:
        return shared_spec(value)


class Budget(_Frozen):
    """Limits that stop loops and runaway runs."""

    max_attempts: int = Field(default=3, ge=1, le=100)
    # A cap a job may set on its own size. None (the default): a job a person wrote may be as large as
    # they wrote it; the planner's output is capped by its own limits (PlanLimits.max_tasks) and this.
    max_tasks: int | None = Field(default=None, ge=1)
    deadline_s: float = Field(default=3600.0, gt=0)
    max_tokens: int | None = Field(default=None, ge=1)
    # How long a task may wait for a capability that no live worker serves before it fails (guard no_worker).
    no_worker_s: float = Field(default=300.0, gt=0)
    # Delay before the next attempt after a worker's retryable failure; doubles per attempt (0: at once).
    retry_backoff_s: float = Field(default=0.0, ge=0)


class Job(_Frozen):
    """A goal and the tasks that reach it, run in dependency order."""

    goal: str = Field(min_length=1)
    tasks: tuple[TaskDef, ...] = ()
    budget: Budget = Field(default_factory=Budget)

    @model_validator(mode="after")
    def _check_graph(self) -> Job:
        check_graph(self)
        return self

    def task(self, task_id: str) -> TaskDef:
        """The task with this id."""
        for t in self.tasks:
            if t.id == task_id:
                return t
        raise KeyError(task_id)


def check_graph(job: Job, source: str | None = None) -> None:
    """Reject duplicate ids, unknown dependencies, cycles and oversized jobs."""
    ids: set[str] = set()
    for t in job.tasks:
        if t.id in ids:
            raise JobError("duplicate task id", source=source, task_id=t.id, field="id")
        ids.add(t.id)
    for t in job.tasks:
        for dep in t.depends_on:
            if dep not in ids:
                raise JobError(f"depends on unknown task {dep!r}", source=source, task_id=t.id, field="depends_on")
            if dep == t.id:
                raise JobError("depends on itself", source=source, task_id=t.id, field="depends_on")
    if job.budget.max_tasks is not None and len(job.tasks) > job.budget.max_tasks:
        raise JobError(f"{len(job.tasks)} tasks exceed budget.max_tasks={job.budget.max_tasks}", source=source,
                       field="tasks")
    cycle = _find_cycle({t.id: t.depends_on for t in job.tasks})
    if cycle:
        raise JobError(f"dependency cycle {' -> '.join(cycle)}", source=source, task_id=cycle[0],
                       field="depends_on")


def _find_cycle(graph: Mapping[str, Collection[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in graph:
        if node not in state and (found := visit(node)):
            return found
    return None


def parse_job(data: Any, *, source: str | None = None, capabilities: Collection[str] | None = None,
              checks: CheckRegistry | None = None) -> Job:
    """Validate a job from plain data; ``capabilities``, when given, are the only ones allowed.

    ``checks`` are the check names a task may use (default: installed ones and ``ORCH_ALLOW_CHECKS``).
    """
    if isinstance(data, Job):
        job = data
    else:
        if not isinstance(data, Mapping):
            raise JobError(f"a job must be a mapping with 'goal' and 'tasks', got {type(data).__name__}",
                           source=source)
        try:
            check_shape(data, JOB_LIMITS, what="the job")
        except LimitExceeded as exc:
            raise JobError(str(exc), source=source) from exc
        try:
            job = Job.model_validate(data)
        except JobError as exc:
            raise JobError(exc.reason, source=source, task_id=exc.task_id, field=exc.field) from exc
        except ValidationError as exc:
            raise _job_error(exc, data, source) from exc
    if capabilities is not None:
        for t in job.tasks:
            if t.capability not in capabilities:
                known = ", ".join(sorted(capabilities)) or "none"
                raise JobError(f"unknown capability {t.capability!r} (available: {known})", source=source,
                               task_id=t.id, field="capability")
    _resolve_checks(job, checks or default_checks(), source=source)
    return job


def parse_job_in_parts(header: Any, tasks: Iterable[Any], *, source: str | None = None,
                       checks: CheckRegistry | None = None, limits: ShapeLimits = JOB_LIMITS) -> Job:
    """``parse_job`` of ``{**header, "tasks": [...]}``, each task checked and validated as it comes.

    For a job read from a stream of its tasks (a staged submission): only one task's plain data is alive at
    a time, not the whole job's beside the models made from it (~80 MB at 100,000 tasks). ``limits`` bound the
    job as ``parse_job`` bounds a whole one: a task sits two levels down (the job, its list of tasks), and the
    values of all its tasks count against one total.
    """
    if not isinstance(header, Mapping):
        raise JobError(f"a job must be a mapping with 'goal' and 'tasks', got {type(header).__name__}", source=source)
    if "tasks" in header:
        raise JobError("the job's header holds tasks; they come after it", source=source)
    task_limits = dataclasses.replace(limits, max_depth=limits.max_depth - 2)
    counted = 0
    defs: list[TaskDef] = []
    for index, raw in enumerate(tasks):
        try:
            counted += check_shape(raw, task_limits, what=f"task #{index + 1}")
            if counted > limits.max_items:
                raise LimitExceeded(f"the job holds more than {limits.max_items} values (limit max_items)")
        except LimitExceeded as exc:
            raise JobError(str(exc), source=source) from exc
        try:
            defs.append(TaskDef.model_validate(raw))
        except ValidationError as exc:
            # named by its id, or by its place when it has none
            raise _job_error(exc, {"tasks": [None] * index + [raw]}, source,
                             index_of=functools.partial(_in_task, index)) from exc
    return parse_job({**header, "tasks": defs}, source=source, checks=checks)


def _in_task(index: int, loc: tuple[Any, ...]) -> tuple[Any, ...]:
    return ("tasks", index, *loc)


def _resolve_checks(job: Job, checks: CheckRegistry, *, source: str | None = None) -> None:
    """Resolve every task's ``spec.check`` now, so a bad name fails the job, not an attempt an hour later."""
    for t in job.tasks:
        if t.spec.check:
            try:
                checks.resolve(t.spec.check)
            except ConfigError as exc:
                raise JobError(str(exc), source=source, task_id=t.id, field="spec.check") from exc


def load_job(path: str | Path, *, capabilities: Collection[str] | None = None,
             checks: CheckRegistry | None = None) -> Job:
    """Read and validate a YAML (or JSON) job file."""
    data = read_yaml(path, JobError, what="job file")
    return parse_job(data, source=str(path), capabilities=capabilities, checks=checks)


def _job_error(exc: ValidationError, data: Mapping[str, Any], source: str | None,
               index_of: Callable[[tuple[Any, ...]], tuple[Any, ...]] | None = None) -> JobError:
    """The first problem ``exc`` found in ``data``, naming the task and field (``index_of`` maps an error's
    location in a part of the job to its location in ``data``)."""
    err = exc.errors()[0]
    if err["type"] == "value_error" and "Value error, " in err["msg"]:
        err["msg"] = err["msg"].removeprefix("Value error, ")
    loc = list(index_of(tuple(err["loc"])) if index_of else err["loc"])
    task_id = None
    if len(loc) >= 2 and loc[0] == "tasks" and isinstance(loc[1], int):
        tasks = data.get("tasks")
        raw = tasks[loc[1]] if isinstance(tasks, list) and loc[1] < len(tasks) else None
        task_id = str(raw.get("id")) if isinstance(raw, Mapping) and raw.get("id") else f"#{loc[1] + 1}"
        loc = loc[2:]
    field = ".".join(str(p) for p in loc) or None
    message = err["msg"]
    if err["type"] == "missing":
        message = "is required"
    elif err["type"] == "extra_forbidden":
        message = "is not a known field"
    more = exc.error_count() - 1
    return JobError(message + (f" (and {more} more problems)" if more else ""), source=source, task_id=task_id,
                    field=field)
