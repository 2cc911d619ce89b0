"""What the manager knows about runs and tasks, and the events that changed it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, Field

from orchestrator.job import Job, Spec, TaskDef
from protocol.envelope import Envelope, new_id
from protocol.messages import Redo, RunEvent, RunEvents
from protocol.states import TERMINAL, TaskState

__all__ = ("AttemptRecord", "Event", "RunRecord", "RunState", "TaskRecord")


class RunState(StrEnum):
    """Where a run stands."""

    RUNNING = "running"
    ACCEPTED = "accepted"
    FAILED = "failed"
    CANCELLED = "cancelled"


class AttemptRecord(BaseModel):
    """One attempt at a task: who did it, what came back, what the verifiers said."""

    attempt: int
    worker: str = ""
    output: Any = None
    error: str = ""
    verdict: dict[str, Any] | None = None
    started: float = Field(default_factory=time.time)
    finished: float | None = None


class TaskRecord(BaseModel):
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
    verify_stage: str = ""  # where a verify_done task is: "spec", "worker" or "judge"
    self_check: bool = False  # the worker said it can verify its own results
    redo: list[Redo] = Field(default_factory=list)
    attempts: list[AttemptRecord] = Field(default_factory=list)

    @classmethod
    def from_def(cls, t: TaskDef, default_attempts: int) -> TaskRecord:
        """A fresh record for a job's task."""
        return cls(id=t.id, capability=t.capability, instruction=t.instruction, input=t.input,
                   depends_on=t.depends_on, spec=t.spec, max_attempts=t.max_attempts or default_attempts,
                   max_tokens=t.max_tokens, timeout_s=t.timeout_s, config=t.config)

    @property
    def terminal(self) -> bool:
        """Whether the task has ended (accepted, failed or cancelled)."""
        return self.state in TERMINAL

    def summary(self) -> dict[str, Any]:
        """The per-task object of ``--json`` output."""
        return {"id": self.id, "capability": self.capability, "state": str(self.state), "attempts": self.attempt,
                "output": self.output, "reason": self.reason, "worker": self.worker, "tokens": self.tokens}


class RunRecord(BaseModel):
    """A run of a job."""

    run_id: str = Field(default_factory=new_id)
    goal: str
    job: Job
    state: RunState = RunState.RUNNING
    tasks: dict[str, TaskRecord]
    created: float = Field(default_factory=time.time)
    deadline: float
    finished: float | None = None
    reason: str = ""
    tokens: int = 0
    next_seq: int = 1

    @classmethod
    def new(cls, job: Job, run_id: str | None = None) -> RunRecord:
        """A run of ``job`` that has not started any task."""
        now = time.time()
        tasks = {t.id: TaskRecord.from_def(t, job.budget.max_attempts) for t in job.tasks}
        return cls(run_id=run_id or new_id(), goal=job.goal, job=job, tasks=tasks, created=now,
                   deadline=now + job.budget.deadline_s)

    def summary(self) -> dict[str, Any]:
        """The ``--json`` object of ``orchestrator run`` and ``status``."""
        return {"run_id": self.run_id, "goal": self.goal, "state": str(self.state), "reason": self.reason,
                "tokens": self.tokens, "tasks": [t.summary() for t in self.tasks.values()]}


class Event(BaseModel):
    """One entry of a run's history: a transition, a dispatch, a note."""

    seq: int
    run_id: str
    task_id: str = ""
    attempt: int = 0
    time: float = Field(default_factory=time.time)
    kind: str  # "transition", "dispatch", "progress", "run"
    event: str
    from_state: str = ""
    to_state: str = ""
    actor: str = ""
    detail: dict[str, Any] = Field(default_factory=dict)

    @staticmethod
    def to_envelope(run_id: str, events: Sequence[Event], sender: str) -> Envelope:
        """Events of one run as one bus message, for followers on other machines."""
        body = RunEvents(events=tuple(RunEvent.model_construct(
            seq=e.seq, task_id=e.task_id, attempt=e.attempt, time=e.time, kind=e.kind, event=e.event,
            from_state=e.from_state, to_state=e.to_state, actor=e.actor, detail=e.detail) for e in events))
        return Envelope.model_construct(run_id=run_id, sender=sender, body=body)  # built from checked values

    @classmethod
    def from_envelope(cls, env: Envelope) -> list[Event]:
        """The events a ``run_events`` message carries."""
        body = env.body
        if not isinstance(body, RunEvents):
            raise TypeError(f"not a run_events message: {env.type!r}")
        return [cls(seq=e.seq, run_id=env.run_id, task_id=e.task_id, attempt=e.attempt, time=e.time, kind=e.kind,
                    event=e.event, from_state=e.from_state, to_state=e.to_state, actor=e.actor, detail=e.detail)
                for e in body.events]
