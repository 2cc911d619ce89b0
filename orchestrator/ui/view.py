"""A run as the console draws it: the task tree with each attempt, folded from the run's history.

The tree is ``protocol.history.RunFold`` (the same fold ``watch`` and a replay use); on top of it
each task keeps its attempts: who worked on it, what came back, every verdict and every person's
decision, so the page shows why a task was redone, not just that it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from protocol.history import (
    Dispatched,
    HistoryEvent,
    OverrideGiven,
    OverrideRefused,
    RunFold,
    TaskFold,
    Transitioned,
    VerdictGiven,
)
from protocol.messages import OverrideAction
from protocol.states import TERMINAL, RunState, TaskEvent, TaskState, VerifyStage, override_allowed

__all__ = ("RunPage",)

TASK_ACTIONS: tuple[OverrideAction, ...] = ("approve", "reject", "redo", "accept", "cancel")


@dataclass(slots=True)
class _Attempt:
    number: int
    dispatched: float | None = None
    worker: str = ""
    output: Any = None
    tokens: int = 0
    duration_s: float = 0.0
    error: str = ""
    outcome: str = ""
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    decisions: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"attempt": self.number, "dispatched": self.dispatched, "worker": self.worker, "output": self.output,
                "tokens": self.tokens, "duration_s": self.duration_s, "error": self.error, "outcome": self.outcome,
                "verdicts": self.verdicts, "decisions": self.decisions}


def _verdict(v: VerdictGiven) -> dict[str, Any]:
    return {"stage": str(v.stage), "verifier": v.verifier, "passed": v.passed, "feedback": v.feedback,
            "corrections": list(v.corrections), "tokens": v.tokens}


class RunPage:
    """Feed it a run's history in order (``apply``); ``to_json`` is what the page renders."""

    def __init__(self) -> None:
        self.fold = RunFold()
        self.attempts: dict[str, dict[int, _Attempt]] = {}
        self.seen = 0

    def apply(self, event: HistoryEvent) -> None:
        """Fold one event in; an event seen before (a reconnect reading again) changes nothing."""
        if event.seq <= self.seen:
            return
        self.seen = event.seq
        self.fold.apply(event)
        if not event.task_id:
            return
        attempt = self._attempt(event.task_id, event.attempt)
        body = event.body
        match body:
            case Dispatched():
                attempt.dispatched = event.time
            case VerdictGiven():
                attempt.verdicts.append(_verdict(body))
            case Transitioned():
                self._transition(attempt, event, body)
            case OverrideGiven():
                attempt.decisions.append({"action": body.action, "by": event.actor, "feedback": body.feedback,
                                          "applied": True, "reason": "", "time": event.time})
            case OverrideRefused():
                attempt.decisions.append({"action": body.action, "by": event.actor, "feedback": "",
                                          "applied": False, "reason": body.reason, "time": event.time})

    def _attempt(self, task_id: str, number: int) -> _Attempt:
        attempts = self.attempts.setdefault(task_id, {})
        if number not in attempts:
            attempts[number] = _Attempt(number)
        return attempts[number]

    @staticmethod
    def _transition(attempt: _Attempt, event: HistoryEvent, body: Transitioned) -> None:
        if body.event is TaskEvent.DONE:
            attempt.worker, attempt.output = event.actor, body.output
            attempt.tokens, attempt.duration_s = body.tokens, body.duration_s
        if body.error:
            attempt.worker = attempt.worker or event.actor
            attempt.error = body.error
        if body.verdict is not None:
            attempt.verdicts.append(_verdict(body.verdict))
        if body.event is TaskEvent.REJECT:
            attempt.outcome = "rejected"
        elif body.event is TaskEvent.RETRY:
            attempt.outcome = "failed, retried"
        elif body.to_state in TERMINAL:
            attempt.outcome = str(body.to_state)

    def to_json(self) -> dict[str, Any]:
        """The run for the page: head, tasks in tree order with depth, attempts, and what a person may do."""
        fold = self.fold
        depth = _depths(fold)
        running = fold.state is RunState.RUNNING
        tasks = [self._task_json(t, depth.get(t.id, 0), running) for t in _tree_order(fold, depth)]
        return {"run_id": fold.run_id, "goal": fold.goal, "state": str(fold.state), "reason": fold.reason,
                "started": fold.started, "tokens": fold.tokens, "last_seq": fold.last_seq, "held": fold.held,
                "note": fold.note, "tasks": tasks,
                "actions": ["cancel"] if running else []}

    def _task_json(self, task: TaskFold, depth: int, running: bool) -> dict[str, Any]:
        waiting = task.waiting
        # The fold does not carry the verify stage; a task waits for a person only at the human stage.
        stage = VerifyStage.HUMAN if waiting is not None and waiting.for_ == "person" else None
        actions = [a for a in TASK_ACTIONS if running and override_allowed(a, task.state, stage)]
        if stage is None and task.state is TaskState.VERIFY_DONE:
            actions = [a for a in actions if a != "approve"]
        attempts = sorted(self.attempts.get(task.id, {}).values(), key=lambda a: a.number)
        return {"id": task.id, "capability": task.capability, "depends_on": list(task.depends_on), "depth": depth,
                "state": str(task.state), "attempt": task.attempt, "worker": task.worker, "tokens": task.tokens,
                "waiting": None if waiting is None else {**waiting.model_dump(mode="json", by_alias=True),
                                                         "text": waiting.describe()},
                "reason": task.reason, "guard": task.guard, "note": task.note, "redos": task.redos,
                "started": task.started, "finished": task.finished, "actions": actions,
                "attempts": [a.to_json() for a in attempts if a.number > 0 or a.decisions]}


def _depths(fold: RunFold) -> dict[str, int]:
    """How deep each task sits: one more than its deepest dependency (cycles cannot reach here, but stop anyway)."""
    depth: dict[str, int] = {}

    def of(task_id: str, seen: frozenset[str]) -> int:
        if task_id in depth:
            return depth[task_id]
        task = fold.tasks.get(task_id)
        deps = [d for d in (task.depends_on if task else ()) if d in fold.tasks and d not in seen]
        depth[task_id] = 1 + max((of(d, seen | {task_id}) for d in deps), default=-1)
        return depth[task_id]

    for task_id in fold.tasks:
        of(task_id, frozenset())
    return depth


def _tree_order(fold: RunFold, depth: dict[str, int]) -> list[TaskFold]:
    """Each task after the dependency it hangs from (its deepest), roots in job order."""
    children: dict[str, list[str]] = {}
    roots: list[str] = []
    for task in fold.tasks.values():
        known = [d for d in task.depends_on if d in fold.tasks]
        if not known:
            roots.append(task.id)
            continue
        parent = max(known, key=lambda d: depth.get(d, 0))
        children.setdefault(parent, []).append(task.id)
    out: list[TaskFold] = []
    placed: set[str] = set()

    def place(task_id: str) -> None:
        if task_id in placed:
            return
        placed.add(task_id)
        out.append(fold.tasks[task_id])
        for child in children.get(task_id, ()):
            place(child)

    for root in roots:
        place(root)
    for task_id in fold.tasks:  # anything a cycle kept out of the walk
        place(task_id)
    return out



def page_from_status(status: dict[str, Any]) -> dict[str, Any]:
    """The page's run from a summary alone: for a run whose history has expired, or one still queued."""
    tasks = []
    for t in status.get("tasks") or []:
        tasks.append({"id": t.get("id", ""), "capability": t.get("capability", ""), "depends_on": [], "depth": 0,
                      "state": t.get("state", ""), "attempt": t.get("attempts", 0), "worker": t.get("worker", ""),
                      "tokens": t.get("tokens", 0), "waiting": None, "reason": t.get("reason", ""), "guard": "",
                      "note": "", "redos": 0, "started": None, "finished": None, "actions": [],
                      "attempts": [] if t.get("output") is None else [
                          {"attempt": t.get("attempts", 0), "dispatched": None, "worker": t.get("worker", ""),
                           "output": t.get("output"), "tokens": t.get("tokens", 0), "duration_s": 0.0, "error": "",
                           "outcome": "", "verdicts": [], "decisions": []}]})
    return {"run_id": status.get("run_id", ""), "goal": status.get("goal", ""), "state": status.get("state", ""),
            "reason": status.get("reason", ""), "started": None, "tokens": status.get("tokens", 0), "last_seq": 0,
            "tasks": tasks, "actions": [], "history_missing": True}
