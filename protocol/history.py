"""A run's history: one typed event union, used on the wire, in the ledger and by every reader.

Each entry is a ``HistoryEvent`` (sequence number, ids, time, actor) around a body that says
what happened, a discriminated union on ``kind``. Nobody matches strings: readers match on the
body's type. A run's state is a fold of its history (``RunFold``), so a follower on another
machine, a display and a replay test all see the same run the manager saw.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field

from protocol._compact import SharedFieldsSet
from protocol.states import TERMINAL, RunState, TaskEvent, TaskState, VerifyStage

__all__ = (
    "DispatchHeld",
    "Dispatched",
    "Guard",
    "HistoryBody",
    "HistoryEvent",
    "OverrideGiven",
    "OverrideRefused",
    "ProgressNoted",
    "RunFinished",
    "RunFold",
    "RunStarted",
    "TaskFold",
    "TaskOutline",
    "Transitioned",
    "VerdictGiven",
    "Waiting",
    "WaitingChanged",
    "WaitingFor",
)

# Which budget or safety rule ended a task.
Guard = Literal["attempts", "tokens", "deadline", "loop", "repeated_feedback", "dead_letter", "no_worker",
                "not_retryable"]

WaitingFor = Literal["worker", "person", "dependency", "retry"]


class _Model(SharedFieldsSet):
    # Events are made four or more per task and a run start outlines every task: one fields-set per class.
    model_config = ConfigDict(frozen=True, extra="forbid")


class Waiting(_Model):
    """What an unfinished task that is not moving waits for, and since when (wall-clock seconds)."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    for_: WaitingFor = Field(alias="for")
    since: float
    capability: str = ""  # for ``worker``: the capability no live worker serves
    on: tuple[str, ...] = ()  # for ``dependency``: the tasks not accepted yet

    def same_wait(self, other: Waiting) -> bool:
        """Whether ``other`` waits for the same thing (whatever its ``since``)."""
        return (self.for_, self.capability, self.on) == (other.for_, other.capability, other.on)

    def describe(self) -> str:
        """A short sentence for a person."""
        match self.for_:
            case "worker":
                return f"waiting for a worker of capability {self.capability!r}"
            case "person":
                return "waiting for a person to approve"
            case "dependency":
                return f"waiting for {', '.join(self.on)}"
            case _:
                return "waiting to retry"


class TaskOutline(_Model):
    """A task as the run starts: enough for a follower to draw the tree."""

    id: str
    capability: str
    depends_on: tuple[str, ...] = ()


class RunStarted(_Model):
    kind: Literal["run_started"] = "run_started"
    goal: str
    tasks: tuple[TaskOutline, ...] = ()


class Dispatched(_Model):
    """A new attempt of the task was sent to its capability."""

    kind: Literal["dispatched"] = "dispatched"
    capability: str


class VerdictGiven(_Model):
    """One verifier's verdict on the current attempt."""

    kind: Literal["verdict"] = "verdict"
    stage: VerifyStage
    passed: bool
    verifier: str
    feedback: str = ""
    corrections: tuple[str, ...] = ()
    tokens: int = 0


class Transitioned(_Model):
    """The task's state changed by ``event``; what came with it rides along."""

    kind: Literal["transition"] = "transition"
    event: TaskEvent
    from_state: TaskState
    to_state: TaskState
    reason: str = ""
    guard: Guard | None = None  # set when a budget or safety rule ended the task
    output: Any = None  # on ``done``: the output, clipped for display
    tokens: int = 0  # on ``done``: what the attempt cost
    duration_s: float = 0.0  # on ``done``: how long the worker took
    error: str = ""  # on ``retry`` and worker failures: the worker's error
    verdict: VerdictGiven | None = None  # on ``pass`` and ``reject``: the verdict that decided it


class OverrideGiven(_Model):
    """A person's decision, as applied. The event's ``actor`` is who gave it."""

    kind: Literal["override"] = "override"
    action: str
    feedback: str = ""


class OverrideRefused(_Model):
    """A person's decision that did not apply, and why."""

    kind: Literal["override_refused"] = "override_refused"
    action: str
    reason: str


class WaitingChanged(_Model):
    """The task started waiting for something (or stopped: ``waiting`` is None)."""

    kind: Literal["waiting"] = "waiting"
    waiting: Waiting | None


class DispatchHeld(_Model):
    """Tasks ready to go, held back because the run has ``window`` tasks in flight, its most; they go out,
    oldest first, as tasks in flight end. Said when holding begins and when it ends (``held`` is 0);
    the run's summary has the count in between."""

    kind: Literal["held"] = "held"
    held: int
    window: int


class ProgressNoted(_Model):
    """A worker's progress note."""

    kind: Literal["progress"] = "progress"
    message: str = ""
    fraction: float | None = None


class RunFinished(_Model):
    kind: Literal["run_finished"] = "run_finished"
    state: RunState
    reason: str = ""


HistoryBody = Annotated[
    RunStarted | Dispatched | Transitioned | VerdictGiven | OverrideGiven | OverrideRefused | WaitingChanged
    | DispatchHeld | ProgressNoted | RunFinished,
    Field(discriminator="kind"),
]


class HistoryEvent(_Model):
    """One entry of a run's history."""

    seq: int
    run_id: str
    task_id: str = ""
    attempt: int = 0
    time: float  # wall clock, for people; budgets run on a monotonic clock
    actor: str = ""
    body: HistoryBody

    @property
    def kind(self) -> str:
        return self.body.kind

    @property
    def verdict(self) -> VerdictGiven | None:
        """The verdict this entry records: a ``verdict`` entry, or the one a ``pass``/``reject`` carries."""
        body = self.body
        if isinstance(body, VerdictGiven):
            return body
        return body.verdict if isinstance(body, Transitioned) else None


@dataclass(slots=True)
class TaskFold:
    """One task as its history tells it."""

    id: str
    capability: str = ""
    depends_on: tuple[str, ...] = ()
    state: TaskState = TaskState.NOT_DONE
    attempt: int = 0
    worker: str = ""
    tokens: int = 0
    waiting: Waiting | None = None
    reason: str = ""
    guard: str = ""
    note: str = ""
    redos: int = 0
    started: float | None = None
    finished: float | None = None


@dataclass(slots=True)
class RunFold:
    """A run folded from its history; feed it events in order with ``apply``."""

    run_id: str = ""
    goal: str = ""
    state: RunState = RunState.RUNNING
    reason: str = ""
    started: float | None = None
    tokens: int = 0
    tasks: dict[str, TaskFold] = field(default_factory=dict)
    redo_log: list[str] = field(default_factory=list)
    last_seq: int = 0
    held: int = 0  # tasks held back by the dispatch window, as last said
    note: str = ""  # the latest run-level override (a whole-run cancel) or refusal, as the tasks' notes read

    def apply(self, event: HistoryEvent) -> None:
        """Fold one event in."""
        self.run_id, self.last_seq = event.run_id, event.seq
        body = event.body
        if isinstance(body, RunStarted):
            self.goal, self.started = body.goal, event.time
            for t in body.tasks:
                self.tasks[t.id] = TaskFold(t.id, capability=t.capability, depends_on=t.depends_on)
            return
        if isinstance(body, RunFinished):
            self.state, self.reason = body.state, body.reason
            return
        if isinstance(body, DispatchHeld):
            self.held = body.held
            return
        if not event.task_id:  # about the run, not a task: a whole-run cancel, or a refusal naming no known task
            if isinstance(body, OverrideGiven | OverrideRefused):
                self.note = _override_note(event, body)
            return
        task = self.tasks.setdefault(event.task_id, TaskFold(event.task_id))
        task.attempt = max(task.attempt, event.attempt)
        verdict = event.verdict
        if verdict is not None:
            self._verdict(task, event, verdict)
        match body:
            case Dispatched():
                task.capability = body.capability
                task.started = task.started or event.time
            case Transitioned():
                self._transition(task, event, body)
            case OverrideGiven() | OverrideRefused():
                task.note = _override_note(event, body)
            case WaitingChanged():
                task.waiting = body.waiting
            case ProgressNoted():
                task.note = body.message

    def _verdict(self, task: TaskFold, event: HistoryEvent, verdict: VerdictGiven) -> None:
        self.tokens += verdict.tokens
        task.tokens += verdict.tokens
        if not verdict.passed:
            self.redo_log.append(f"{task.id} attempt {event.attempt} rejected by {verdict.verifier}: "
                                 f"{verdict.feedback}")

    def _transition(self, task: TaskFold, event: HistoryEvent, body: Transitioned) -> None:
        task.state = body.to_state
        if body.error:  # a worker's failure: the worker is the actor
            task.worker = event.actor
        if body.event is TaskEvent.DONE:
            task.worker = event.actor
            task.tokens += body.tokens
            self.tokens += body.tokens
        elif body.event is TaskEvent.REJECT:
            task.redos += 1
            if body.verdict is not None:
                task.note = f"redo: {body.verdict.feedback}"
        if body.to_state in TERMINAL:
            task.finished = event.time
            task.waiting = None
            task.reason, task.guard = body.reason, body.guard or ""
            task.note = body.reason if body.to_state is not TaskState.ACCEPTED else ""


def _override_note(event: HistoryEvent, body: OverrideGiven | OverrideRefused) -> str:
    if isinstance(body, OverrideRefused):
        return f"{body.action} by {event.actor} refused: {body.reason}"
    return f"{body.action} by {event.actor}" + (f": {body.feedback}" if body.feedback else "")
