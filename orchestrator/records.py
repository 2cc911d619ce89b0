"""What the manager knows about runs and tasks, and the events that changed it."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from orchestrator.job import Job, Spec, TaskDef, shared_spec
from protocol._compact import SharedFieldsSet
from protocol.envelope import Envelope, new_id
from protocol.history import HistoryEvent, Waiting
from protocol.messages import Redo, RunEvents
from protocol.states import TERMINAL, RunState, TaskState, VerifyStage

__all__ = ("AttemptRecord", "Event", "RunRecord", "RunState", "TaskRecord", "events_envelope", "events_of",
           "task_records")


_FROM_DEF: dict[str, bool] = {"from_def": True}  # validation context of records made from a task definition


class _NoConfig(dict[str, Any]):
    """The config of every task that has none: one read-only empty dict instead of one each (64 bytes a task)."""

    def _refuse(self, *args: Any, **kwargs: Any) -> Any:
        raise TypeError("a task's config is read-only")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse


_NO_CONFIG = _NoConfig()


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One attempt at a task: who did it, what came back, what the verifiers said.

    Frozen: the engine replaces a task's current attempt to change it (``amended``), so a copy of the task record
    (a store's, ``TaskRecord.snapshot``) shares its attempts and still never changes. A slotted dataclass, not a
    model: every task of a run keeps one (88 bytes, where a model with its ``__dict__`` took 352), and the record
    holding it validates and serializes it as a model would (a ledger row's JSON is the same).
    """

    attempt: int
    worker: str = ""
    output: Any = None
    error: str = ""
    verdict: dict[str, Any] | None = None
    started: float = 0.0
    finished: float | None = None

    def amended(self, **changes: Any) -> AttemptRecord:
        """This attempt with ``changes`` made."""
        return replace(self, **changes)


class TaskRecord(SharedFieldsSet):
    """A task's definition and its live state; changed only by the manager through ``transition``."""

    id: str
    capability: str
    instruction: str = ""
    input: Any = None
    depends_on: tuple[str, ...] = ()
    spec: Spec = Field(default_factory=Spec)
    max_attempts: int = 3
    max_tokens: int | None = None
    timeout_s: float | None = None
    config: dict[str, Any] = Field(default_factory=dict)
    state: TaskState = TaskState.NOT_DONE
    attempt: int = 0  # 0 until first dispatched
    output: Any = None
    reason: str = ""
    worker: str = ""
    tokens: int = 0
    verify_stage: VerifyStage | None = None  # which verifier a verify_done task is with
    self_check: bool = False  # the worker said it can verify its own results
    waiting: Waiting | None = None  # what the task waits for when it is not moving
    # Tuples, replaced whole when one is added: most tasks never get a redo, and an empty tuple is one
    # object for all of them where an empty list was 56 bytes a task.
    redo: tuple[Redo, ...] = ()
    attempts: tuple[AttemptRecord, ...] = ()

    @field_validator("spec")
    @classmethod
    def _one_of_each_spec(cls, value: Spec, info: ValidationInfo) -> Spec:
        if info.context is _FROM_DEF:  # the definition's spec, shared when the definition was made
            return value
        return shared_spec(value)

    @field_validator("config")
    @classmethod
    def _shared_empty_config(cls, value: dict[str, Any]) -> dict[str, Any]:
        return value or _NO_CONFIG

    @field_validator("verify_stage", mode="before")
    @classmethod
    def _no_stage(cls, value: Any) -> Any:
        return value or None  # 0.1 ledgers wrote "" for no stage

    @classmethod
    def from_def(cls, t: TaskDef, default_attempts: int) -> TaskRecord:
        """A fresh record for a job's task."""
        return cls.model_validate(
            {"id": t.id, "capability": t.capability, "instruction": t.instruction, "input": t.input,
             "depends_on": t.depends_on, "spec": t.spec, "max_attempts": t.max_attempts or default_attempts,
             "max_tokens": t.max_tokens, "timeout_s": t.timeout_s, "config": t.config}, context=_FROM_DEF)

    def snapshot(self) -> TaskRecord:
        """A copy that later changes to this record do not reach.

        Shallow, and enough: what a record holds is immutable (strings, tuples, frozen models: its attempts, redo
        and waiting) or never changed in place (its input and output, which are a worker's or a job's data, and
        its config). ``tests/orchestrator/test_records.py`` drives the engine through retries, rejections and a
        person's overrides, and checks that no copy taken before a change sees it.
        """
        return self.model_copy()

    @property
    def terminal(self) -> bool:
        """Whether the task has ended (accepted, failed or cancelled)."""
        return self.state in TERMINAL

    def summary(self) -> dict[str, Any]:
        """The per-task object of ``--json`` output."""
        return {"id": self.id, "capability": self.capability, "state": str(self.state), "attempts": self.attempt,
                "output": self.output, "reason": self.reason, "worker": self.worker, "tokens": self.tokens,
                "stage": None if self.verify_stage is None else str(self.verify_stage),
                "waiting": None if self.waiting is None else self.waiting.model_dump(mode="json", by_alias=True)}


class RunRecord(BaseModel):
    """A run of a job."""

    run_id: str = Field(default_factory=new_id)
    goal: str
    # The job as submitted. Its task list is let go once the run is stored (``release_task_defs``): each
    # task's definition is in its record in ``tasks`` (and in the ledger's task rows).
    job: Job
    state: RunState = RunState.RUNNING
    tasks: dict[str, TaskRecord]
    created: float = Field(default_factory=time.time)
    # Time a manager has run this run, on a monotonic clock: what ``budget.deadline_s`` is measured
    # against, so neither a wall-clock jump nor a stopped manager spends it.
    elapsed_s: float = 0.0
    finished: float | None = None
    reason: str = ""
    tokens: int = 0
    next_seq: int = 1
    held: int = 0  # ready tasks held back by the manager's dispatch window (``ManagerSettings.dispatch_window``)

    @classmethod
    def new(cls, job: Job, run_id: str | None = None, *, now: float | None = None,
            tasks: dict[str, TaskRecord] | None = None) -> RunRecord:
        """A run of ``job`` that has not started any task (``tasks``: its records, made already by ``task_records``)."""
        if tasks is None:
            tasks = dict(task_records(job.tasks, job.budget.max_attempts))
        return cls(run_id=run_id or new_id(), goal=job.goal, job=job, tasks=tasks,
                   created=time.time() if now is None else now)

    def snapshot(self) -> RunRecord:
        """A copy that later changes to this run and its task records do not reach (``TaskRecord.snapshot``)."""
        return self.model_copy(update={"tasks": {task_id: task.snapshot() for task_id, task in self.tasks.items()}})

    def release_task_defs(self) -> None:
        """Keep the job's goal and budget, not its task list (a second copy of every task's definition)."""
        if self.job.tasks:
            self.job = self.job.model_copy(update={"tasks": ()})

    def summary(self, *, with_tasks: bool = True) -> dict[str, Any]:
        """The ``--json`` object of ``orchestrator run`` and ``status``."""
        states = Counter(str(task.state) for task in self.tasks.values())
        head: dict[str, Any] = {"run_id": self.run_id, "goal": self.goal, "state": str(self.state),
                                "reason": self.reason, "tokens": self.tokens, "held": self.held,
                                # when it was submitted, and its history's length: what a reader of the
                                # bus's copy of the history can check it against
                                "created": self.created, "last_seq": self.next_seq - 1,
                                # before the tasks, so a reader of the summary's first bytes has them (summary_head)
                                "task_count": len(self.tasks), "task_states": dict(states)}
        if with_tasks:
            head["tasks"] = [t.summary() for t in self.tasks.values()]
        return head


def task_records(defs: Sequence[TaskDef], default_attempts: int) -> Iterator[tuple[str, TaskRecord]]:
    """Fresh records for ``defs``, by id: what ``RunRecord.new`` makes, a part at a time."""
    for t in defs:
        yield t.id, TaskRecord.from_def(t, default_attempts)


Event = HistoryEvent  # the name readers of orchestrator have used; one model everywhere


def events_envelope(run_id: str, events: Sequence[HistoryEvent], sender: str) -> Envelope:
    """Events of one run as one bus message, for followers on other machines."""
    # Validated, not model_construct: the events are model instances, which validation takes as they
    # are, and model_construct resolves every default factory's signature on each call (6x slower).
    return Envelope(run_id=run_id, sender=sender, body=RunEvents(events=tuple(events)))


def events_of(env: Envelope, after_seq: int = 0) -> list[HistoryEvent]:
    """The events a ``run_events`` message carries: only those of the envelope's run, and past ``after_seq``.

    The mirror is sent at least once: a send the manager cut short as it stopped goes again at its last commit,
    so a reader passes the last ``seq`` it has and skips what it saw.
    """
    body = env.body
    if not isinstance(body, RunEvents):
        raise TypeError(f"not a run_events message: {env.type!r}")
    return [e for e in body.events if e.run_id == env.run_id and e.seq > after_seq]
