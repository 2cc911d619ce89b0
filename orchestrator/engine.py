"""The run engine: every rule of a run, as a pure function of its inputs.

``RunEngine(run).apply(input) -> effects`` is synchronous and deterministic: no I/O, no clock
reads (each input carries the time), no randomness. It changes the run's records and returns
what the world must do: record these history events, send this assign, run that verifier, stop
that work, end the run. The manager is the shell that feeds it bus messages, timer ticks and
worker presence, and carries the effects out (the sans-IO shape of h11 and h2). Because it is
pure, the rules are tested without a bus, sleeps or threads, and a hypothesis state machine
drives it through arbitrary interleavings.

Liveness is part of the rules: after every input each unfinished task is either moving,
``waiting`` for something named (a worker of a capability, a person, a dependency, a retry), or
held back by the run's dispatch window (one run-level ``held`` event says so for all of them: a
100,000-task run would otherwise say it 90,000 times), and every wait has a budget or a person
behind it.
"""

from __future__ import annotations

import json
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from orchestrator.records import AttemptRecord, RunRecord, TaskRecord
from orchestrator.verifier import data_checks
from protocol.history import (
    Dispatched,
    DispatchHeld,
    Guard,
    HistoryBody,
    HistoryEvent,
    OverrideGiven,
    OverrideRefused,
    ProgressNoted,
    RunFinished,
    RunStarted,
    TaskOutline,
    Transitioned,
    VerdictGiven,
    Waiting,
    WaitingChanged,
)
from protocol.messages import Done, Failed, Heartbeat, OverrideAction, Progress, Redo, Verdict, VerifyResponse
from protocol.states import (
    VERIFY_CHAIN,
    RunState,
    TaskEvent,
    TaskState,
    VerifyStage,
    override_allowed,
    transition,
)

__all__ = (
    "Cancel",
    "Checked",
    "DeadLettered",
    "Effect",
    "Ended",
    "Input",
    "Instant",
    "Override",
    "Presence",
    "Redrive",
    "Refused",
    "Reply",
    "RequestCheck",
    "RunEngine",
    "SendAssign",
    "Start",
    "StopWork",
    "Tick",
)

_CONTEXT_CHARS = 2000
_CLIP_CHARS = 500


@dataclass(frozen=True, slots=True)
class Instant:
    """When an input happened: wall clock for people, monotonic clock for budgets."""

    wall: float
    mono: float


# -- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """The run was submitted: record its start and dispatch what is ready."""

    at: Instant


@dataclass(frozen=True, slots=True)
class Reply:
    """A worker's message about a task, as it arrived on ``capability``'s result stream.

    ``signer`` is the identity whose key signed it, when the bus verifies signatures (None on an
    unsigned bus, where nothing about the sender is proven).
    """

    task_id: str
    attempt: int
    sender: str
    capability: str
    body: Done | Failed | VerifyResponse | Heartbeat | Progress
    at: Instant
    signer: str | None = None


@dataclass(frozen=True, slots=True)
class Checked:
    """A verifier the shell ran (spec checks or the judge) gave this verdict on ``attempt``."""

    task_id: str
    attempt: int
    stage: VerifyStage
    verdict: Verdict
    at: Instant


@dataclass(frozen=True, slots=True)
class Override:
    """A person's decision about a task."""

    task_id: str
    action: OverrideAction
    feedback: str
    by: str
    at: Instant


@dataclass(frozen=True, slots=True)
class Cancel:
    """Stop one task (or every unfinished task when ``task_id`` is empty)."""

    task_id: str
    by: str
    reason: str
    at: Instant


@dataclass(frozen=True, slots=True)
class Presence:
    """The capabilities live workers serve now (what the bus's presence records say)."""

    served: frozenset[str]
    at: Instant


@dataclass(frozen=True, slots=True)
class Tick:
    """Time passed."""

    at: Instant


@dataclass(frozen=True, slots=True)
class DeadLettered:
    """The bus gave up on the task's message for ``attempt`` (poison)."""

    task_id: str
    attempt: int
    reason: str
    at: Instant


@dataclass(frozen=True, slots=True)
class Redrive:
    """Send again whatever each task waits for: a new manager took the run over, or the bus lost its data."""

    at: Instant


Input = Start | Reply | Checked | Override | Cancel | Presence | Tick | DeadLettered | Redrive


# -- effects -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SendAssign:
    """Send the task's current attempt to its capability."""

    task_id: str


@dataclass(frozen=True, slots=True)
class RequestCheck:
    """Run verifier ``stage`` on the task's current attempt and feed its verdict back as ``Checked``
    (for ``worker``: send a verify request; the worker's ``VerifyResponse`` comes back as a reply)."""

    task_id: str
    attempt: int
    stage: VerifyStage


@dataclass(frozen=True, slots=True)
class StopWork:
    """Tell workers to stop the task (the whole run when ``task_id`` is empty)."""

    task_id: str
    reason: str
    by: str


@dataclass(frozen=True, slots=True)
class Ended:
    """The run finished."""

    state: RunState
    reason: str


@dataclass(frozen=True, slots=True)
class Refused:
    """The input was not applied (an override that does not fit the task's state); say why to the sender."""

    reason: str


@dataclass(frozen=True, slots=True)
class Ignored:
    """The input changed nothing (a stale, duplicate or misrouted reply); worth a log line, no more.

    ``suspicious`` marks what an honest process never sends (a reply signed by another capability's
    key), which operators should hear about.
    """

    reason: str
    suspicious: bool = False


# A HistoryEvent effect means: persist it with its task's (and run's) records, then publish it.
Effect = HistoryEvent | SendAssign | RequestCheck | StopWork | Ended | Refused | Ignored


# -- the engine --------------------------------------------------------------------------------


class RunEngine:
    """The rules of one run. Not thread-safe; the shell serializes inputs per run."""

    def __init__(self, run: RunRecord, *, actor: str = "manager", judge: bool = False,
                 served: frozenset[str] | None = None, window: int | None = None) -> None:
        self.run = run
        self.actor = actor
        self.judge = judge  # whether a judge exists to run ``description`` checks
        # The most tasks of the run in flight (dispatched and not ended) at once; None: no limit. Past it, ready
        # tasks are held and go out oldest first, a quarter of the window at a time, as tasks in flight end.
        if window is not None and window < 1:
            raise ValueError(f"dispatch window must be at least 1 task (or None for no limit), not {window}")
        self.window = window
        self._in_flight = sum(t.attempt > 0 and not t.terminal for t in run.tasks.values())
        # A run resumed after a restart had these held (ready, never dispatched): they wait their turn again.
        started = run.next_seq > 1
        self._held: deque[str] = deque(t.id for t in run.tasks.values() if started and self._ready(t))
        self._held_ids = set(self._held)
        self._held_said = bool(self._held)
        self._served = served  # None until presence is known: nobody is said to be missing before then
        self._dependents: dict[str, list[str]] = {}
        for task in run.tasks.values():
            for dep in task.depends_on:
                self._dependents.setdefault(dep, []).append(task.id)
        self._unfinished = sum(not t.terminal for t in run.tasks.values())
        self._ended: list[str] = [t.id for t in run.tasks.values() if t.terminal]
        self._last_mono: float | None = None
        self._worker_wait: dict[str, float] = {}  # task id -> monotonic time it began waiting for a worker
        self._retry_at: dict[str, float] = {}  # task id -> monotonic time of its next attempt
        self._effects: list[Effect] = []
        self._touched: dict[str, None] = {}  # tasks whose waiting may have changed (ordered, no repeats)
        self._now = Instant(0.0, 0.0)
        self._tick_due = 0.0  # see tick_due: worked out once per input, read by every tick (five a second)

    @property
    def finished(self) -> bool:
        return self.run.state is not RunState.RUNNING

    def tick_due(self) -> float:
        """The monotonic time before which a ``Tick`` changes nothing in this run, so the shell may skip it.

        Time matters to a run only at its deadline and at a task's retry time; the clock a skipped
        tick would have advanced is caught up by the next input. Both change only with an input.
        """
        return self._tick_due

    def presence_changes(self, served: frozenset[str]) -> bool:
        """Whether a ``Presence`` of ``served`` changes anything in this run, so the shell may skip it: it does when
        the capabilities served differ from the last ones told, or while a task waits for a worker (its
        ``no_worker_s`` runs). As with ticks, the clock a skipped input would have advanced is caught up by the next."""
        return served != self._served or bool(self._worker_wait)

    def apply(self, event: Input) -> list[Effect]:
        """Apply one input; returns what the shell must do, in order."""
        effects = self._apply(event)
        if self._last_mono is not None:  # always, after an input; the run's deadline as monotonic time:
            deadline = self._last_mono + self.run.job.budget.deadline_s - self.run.elapsed_s
            self._tick_due = min(deadline, min(self._retry_at.values(), default=deadline))
        return effects

    def _apply(self, event: Input) -> list[Effect]:
        self._effects = []
        self._now = event.at
        self._advance_clock(event.at)
        if self.finished and not isinstance(event, Override | Reply):
            return []
        match event:
            case Start():
                self._start()
            case Reply():
                self._reply(event)
            case Checked():
                self._checked(event)
            case Override():
                self._override(event)
            case Cancel():
                self._cancel(event.task_id, event.by, event.reason)
            case Presence():
                self._presence(event.served)
            case Tick():
                self._tick()
            case DeadLettered():
                self._dead_lettered(event)
            case Redrive():
                self._redrive()
        self._settle()
        self._update_waiting()
        effects, self._effects = self._effects, []
        return effects

    # -- time ---------------------------------------------------------------------------------

    def _advance_clock(self, at: Instant) -> None:
        if self._last_mono is not None and at.mono > self._last_mono:
            self.run.elapsed_s += at.mono - self._last_mono
        self._last_mono = at.mono if self._last_mono is None else max(self._last_mono, at.mono)

    def _tick(self) -> None:
        budget = self.run.job.budget
        if self.run.elapsed_s >= budget.deadline_s:
            self._exhaust_run(f"run deadline of {budget.deadline_s:g} s passed", guard="deadline")
            return
        for task_id, due in list(self._retry_at.items()):
            if self._now.mono >= due:
                del self._retry_at[task_id]
                task = self.run.tasks[task_id]
                if task.state is TaskState.NOT_DONE:
                    self._dispatch(task)

    # -- starting and dispatching ---------------------------------------------------------------

    def _start(self) -> None:
        run = self.run
        outline = tuple(TaskOutline(id=t.id, capability=t.capability, depends_on=t.depends_on)
                        for t in run.tasks.values())
        self._emit(None, RunStarted(goal=run.goal, tasks=outline))
        if not run.tasks:
            self._finish()
            return
        for task in run.tasks.values():
            if self._ready(task):
                self._go(task)
            else:
                self._touch(task)

    def _go(self, task: TaskRecord) -> None:
        """A ready task's first attempt, or its place behind the others held when the window is full."""
        if self.window is None or (not self._held and self._in_flight < self.window):
            self._in_flight += 1
            self._dispatch(task)
        else:
            self._held.append(task.id)
            self._held_ids.add(task.id)
            if task.waiting is not None:  # it waited for a dependency: that wait is over
                self._touch(task)

    def _release(self) -> None:
        """Dispatch held tasks, oldest first, once a quarter of the window is free (in batches: each release
        is a round of assigns, and one per ended task would be a round trip per reply)."""
        if not self._held or self.window is None or self._in_flight > self.window - max(1, self.window // 4):
            return
        while self._held and self._in_flight < self.window:
            task = self.run.tasks[self._held.popleft()]
            if task.id in self._held_ids:  # not ended (cancelled) while held
                self._held_ids.discard(task.id)
                self._in_flight += 1
                self._dispatch(task)

    def _say_held(self) -> None:
        """Keep the run's count of held tasks, and say in its history when holding begins and ends."""
        held = len(self._held_ids)
        if self.run.held != held:
            self.run.held = held
        if bool(held) != self._held_said:
            self._held_said = bool(held)
            self._emit(None, DispatchHeld(held=held, window=self.window or 0))

    def _ready(self, task: TaskRecord) -> bool:
        tasks = self.run.tasks
        return (task.attempt == 0 and task.state is TaskState.NOT_DONE
                and all(tasks[d].state is TaskState.ACCEPTED for d in task.depends_on))

    def _dispatch(self, task: TaskRecord) -> None:
        task.attempt += 1
        task.verify_stage = None
        task.attempts = (*task.attempts, AttemptRecord(attempt=task.attempt, started=self._now.wall))
        self._emit(task, _dispatched(task.capability))
        self._effects.append(SendAssign(task.id))
        self._touch(task)

    # -- replies --------------------------------------------------------------------------------

    def _reply(self, reply: Reply) -> None:
        task = self.run.tasks.get(reply.task_id)
        if task is None:
            self._ignore(f"reply about unknown task {reply.task_id!r}")
            return
        if reply.capability != task.capability:
            self._ignore(f"reply about task {task.id!r} (capability {task.capability!r}) arrived on the "
                         f"result stream of {reply.capability!r}")
            return
        if reply.signer is not None and reply.signer != f"worker:{task.capability}":
            self._ignore(f"reply about task {task.id!r} (capability {task.capability!r}) is signed by "
                         f"{reply.signer!r}, not by 'worker:{task.capability}'", suspicious=True)
            return
        body = reply.body
        sender = sys.intern(reply.sender)  # kept in records: one string per worker, not one per task
        if isinstance(body, Heartbeat):
            if not task.terminal and reply.attempt == task.attempt > 0:
                task.worker = sender
            return
        if isinstance(body, Progress):
            if not task.terminal and reply.attempt == task.attempt > 0:
                self._emit(task, ProgressNoted(message=body.message, fraction=body.fraction), actor=sender)
            return
        if reply.attempt != task.attempt or task.attempt == 0:
            self._ignore(f"stale {body.type} for attempt {reply.attempt} of task {task.id!r} "
                         f"(attempt {task.attempt} is current)")
        elif isinstance(body, Done) and task.state is TaskState.NOT_DONE and task.id not in self._retry_at:
            self._done(task, sender, body)
        elif isinstance(body, Failed) and task.state is TaskState.NOT_DONE and task.id not in self._retry_at:
            self._failed(task, sender, body)
        elif task.state is TaskState.VERIFY_DONE and task.verify_stage is VerifyStage.WORKER and \
                isinstance(body, VerifyResponse | Failed):
            if isinstance(body, Failed):  # the check itself broke: a rejection that says so, not a silent wait
                verdict = Verdict(passed=False, feedback=f"the worker's own check failed: {body.error}")
            else:
                verdict = body.verdict
            if not verdict.verifier:  # the worker's own check: say whose it was
                verdict = verdict.model_copy(update={"verifier": f"worker:{task.capability}"})
            self._verdict(task, VerifyStage.WORKER, verdict)
        else:
            self._ignore(f"duplicate or late {body.type} for task {task.id!r} in state {task.state}")

    def _done(self, task: TaskRecord, sender: str, done: Done) -> None:
        run = self.run
        task.worker = sender
        task.tokens += done.tokens
        run.tokens += done.tokens
        rejected = [a for a in task.attempts[:-1] if a.verdict is not None and not a.verdict["passed"]]
        task.output = done.output
        _amend_attempt(task, output=done.output, worker=sender, finished=self._now.wall)
        self._transition(task, TaskEvent.DONE, actor=sender, output=_clip(done.output), tokens=done.tokens,
                         duration_s=round(done.duration_s, 4))
        if self._over_token_budget(task):
            return
        if rejected and done.output == rejected[-1].output:
            self._transition(task, TaskEvent.EXHAUST, guard="loop",
                             reason=f"loop: attempt {task.attempt} returned the same output as attempt "
                                    f"{rejected[-1].attempt}, which had failed verification")
            return
        task.self_check = done.self_check
        self._transition(task, TaskEvent.VERIFY)
        self._next_check(task, after=None)

    def _failed(self, task: TaskRecord, sender: str, failed: Failed) -> None:
        task.worker = sender
        _amend_attempt(task, error=failed.error, worker=sender, finished=self._now.wall)
        if not failed.retryable:
            self._transition(task, TaskEvent.EXHAUST, actor=sender, guard="not_retryable", error=failed.error,
                             reason=f"worker failed (not retryable): {failed.error}")
        elif task.attempt >= task.max_attempts:
            self._transition(task, TaskEvent.EXHAUST, actor=sender, guard="attempts", error=failed.error,
                             reason=f"worker failed (attempt {task.attempt} of {task.max_attempts}): {failed.error}")
        else:
            self._transition(task, TaskEvent.RETRY, actor=sender, error=failed.error)
            delay = self.run.job.budget.retry_backoff_s * 2 ** (task.attempt - 1)
            if delay > 0:
                self._retry_at[task.id] = self._now.mono + delay
                self._touch(task)
            else:
                self._dispatch(task)

    # -- verification ---------------------------------------------------------------------------

    def _applies(self, task: TaskRecord, stage: VerifyStage) -> bool:
        match stage:
            case VerifyStage.SPEC:
                spec = task.spec
                return spec.has_expect or spec.schema_ is not None or spec.check is not None
            case VerifyStage.WORKER:
                return task.self_check
            case VerifyStage.JUDGE:
                return bool(task.spec.description) and self.judge
            case VerifyStage.HUMAN:
                return task.spec.approval == "human"

    def _stage_after(self, task: TaskRecord, after: VerifyStage | None) -> VerifyStage | None:
        later = VERIFY_CHAIN if after is None else VERIFY_CHAIN[VERIFY_CHAIN.index(after) + 1:]
        return next((s for s in later if self._applies(task, s)), None)

    def _next_check(self, task: TaskRecord, *, after: VerifyStage | None, given: VerdictGiven | None = None) -> None:
        """Hand the attempt to the next verifier in the chain, or accept it (with ``given``, the deciding
        verdict) when none is left."""
        stage = self._stage_after(task, after)
        task.verify_stage = stage
        self._touch(task)
        if stage is None:
            self._transition(task, TaskEvent.PASS, actor=given.verifier if given else self.actor, verdict=given)
        elif stage is VerifyStage.SPEC:
            self._spec_checks(task)
        elif stage is not VerifyStage.HUMAN:  # a person is waited for, not asked
            self._effects.append(RequestCheck(task.id, task.attempt, stage))

    def _spec_checks(self, task: TaskRecord) -> None:
        """``expect`` and ``schema`` are data: checked here. A ``check`` function is user code: the shell runs it."""
        failed = data_checks(task.spec, task.output)
        if failed is not None:
            self._verdict(task, VerifyStage.SPEC, failed)
        elif task.spec.check is not None:
            self._effects.append(RequestCheck(task.id, task.attempt, VerifyStage.SPEC))
        else:
            self._verdict(task, VerifyStage.SPEC, _SPEC_PASSED)

    def _checked(self, checked: Checked) -> None:
        task = self.run.tasks.get(checked.task_id)
        if (task is None or task.attempt != checked.attempt or task.state is not TaskState.VERIFY_DONE
                or task.verify_stage is not checked.stage):
            self._ignore(f"verdict of {checked.stage} for task {checked.task_id!r} attempt {checked.attempt} "
                         "is no longer wanted")
            return
        self._verdict(task, checked.stage, checked.verdict)

    def _verdict(self, task: TaskRecord, stage: VerifyStage, verdict: Verdict) -> None:
        """Record a verifier's verdict and act on it.

        A verdict that decides the attempt rides on the pass or reject it causes; one that hands the
        attempt on to the next verifier, or whose cost spends the token budget, is an entry of its own.
        """
        _amend_attempt(task, verdict=_verdict_record(verdict))
        given = _verdict_given(stage, verdict)
        task.tokens += verdict.tokens
        self.run.tokens += verdict.tokens
        spent = verdict.tokens > 0 and self._token_budget_spent(task)
        if spent or (verdict.passed and self._stage_after(task, stage) is not None):
            self._emit(task, given, actor=given.verifier)
            if spent:
                self._over_token_budget(task)
                return
            self._next_check(task, after=stage)
        elif verdict.passed:
            self._next_check(task, after=stage, given=given)
        else:
            self._reject(task, verdict, stage, given)

    def _reject(self, task: TaskRecord, verdict: Verdict, stage: VerifyStage | None,
                given: VerdictGiven | None = None) -> None:
        self._transition(task, TaskEvent.REJECT, actor=verdict.verifier or self.actor, verdict=given)
        previous = task.redo[-1].feedback if task.redo else None
        task.redo = (*task.redo, Redo(plan=self._plan(task), context=_context(task), feedback=verdict.feedback,
                                      corrections=verdict.corrections))
        # The same objection twice from a judge or a worker's own check means the worker is not
        # converging. A deterministic check repeats itself by nature: there, loops are caught by a
        # repeated output instead, so a changing output keeps its budget. A person is always heard.
        judged = stage in (VerifyStage.JUDGE, VerifyStage.WORKER)
        if judged and verdict.feedback and previous == verdict.feedback:
            self._transition(task, TaskEvent.EXHAUST, guard="repeated_feedback",
                             reason=f"stuck: attempts {task.attempt - 1} and {task.attempt} got the same feedback: "
                                    f"{verdict.feedback}")
        elif task.attempt >= task.max_attempts:
            self._transition(task, TaskEvent.EXHAUST, guard="attempts",
                             reason=f"failed verification on all {task.max_attempts} attempts; last feedback: "
                                    f"{verdict.feedback}")
        else:
            self._transition(task, TaskEvent.REDISPATCH)
            self._dispatch(task)

    def _token_budget_spent(self, task: TaskRecord) -> bool:
        budget = self.run.job.budget.max_tokens
        return ((task.max_tokens is not None and task.tokens > task.max_tokens)
                or (budget is not None and self.run.tokens > budget))

    def _over_token_budget(self, task: TaskRecord) -> bool:
        """Fail the task (or the whole run) whose token budget is spent; True when it did."""
        if task.max_tokens is not None and task.tokens > task.max_tokens:
            self._transition(task, TaskEvent.EXHAUST, guard="tokens",
                             reason=f"token budget spent: task used {task.tokens} tokens of {task.max_tokens}")
            return True
        budget = self.run.job.budget.max_tokens
        if budget is not None and self.run.tokens > budget:
            self._exhaust_run(f"token budget spent: run used {self.run.tokens} tokens of {budget}", guard="tokens")
            return True
        return False

    # -- people ---------------------------------------------------------------------------------

    def _override(self, override: Override) -> None:
        task = self.run.tasks.get(override.task_id) if override.task_id else None
        if override.action == "cancel" and not override.task_id:
            if self.finished:
                self._refuse(override, f"run {self.run.run_id!r} has already ended ({self.run.state})")
                return
            self._emit(task, OverrideGiven(action="cancel", feedback=override.feedback), actor=override.by)
            self._cancel(override.task_id, override.by, override.feedback or f"cancelled by {override.by}")
            return
        if task is None:
            self._refuse(override, f"run {self.run.run_id!r} has no task {override.task_id!r}")
            return
        if self.finished or not override_allowed(override.action, task.state, task.verify_stage):
            waiting = " (waiting for approval)" if task.verify_stage is VerifyStage.HUMAN else ""
            self._refuse(override, f"cannot {override.action} task {task.id!r} of run {self.run.run_id!r} in state "
                                   f"{str(task.state)!r}{waiting}")
            return
        self._emit(task, OverrideGiven(action=override.action, feedback=override.feedback), actor=override.by)
        person = f"person:{override.by}"
        match override.action:
            case "cancel":
                self._cancel(task.id, override.by, override.feedback or f"cancelled by {override.by}")
            case "approve":
                self._verdict(task, VerifyStage.HUMAN, Verdict(passed=True, verifier=person))
            case "accept":
                if task.state is TaskState.DONE:
                    self._transition(task, TaskEvent.VERIFY, actor=override.by)
                _amend_attempt(task, verdict=_verdict_record(Verdict(passed=True, verifier=person)))
                self._transition(task, TaskEvent.PASS, actor=person,
                                 verdict=VerdictGiven(stage=VerifyStage.HUMAN, passed=True, verifier=person))
            case "reject":
                self._person_rejects(task, override, person)
            case "redo" if task.state in (TaskState.DONE, TaskState.VERIFY_DONE):
                self._person_rejects(task, override, person)
            case "redo" if task.state is TaskState.NOT_DONE and task.attempt > 0:
                # Stop the attempt in flight; the next one carries the person's feedback.
                self._effects.append(StopWork(task.id, f"redo requested by {override.by}", override.by))
                task.redo = (*task.redo, Redo(plan=self._plan(task), context=_context(task), feedback=override.feedback))
                self._retry_at.pop(task.id, None)
                self._transition(task, TaskEvent.RETRY, actor=override.by)
                self._dispatch(task)
            case _:  # redo before the first attempt, or while a redo is pending: the next attempt carries it
                task.redo = (*task.redo, Redo(plan=self._plan(task), context=_context(task), feedback=override.feedback))

    def _person_rejects(self, task: TaskRecord, override: Override, person: str) -> None:
        if task.state is TaskState.DONE:
            self._transition(task, TaskEvent.VERIFY, actor=override.by)
        verdict = Verdict(passed=False, verifier=person, feedback=override.feedback or f"rejected by {override.by}")
        _amend_attempt(task, verdict=verdict.model_dump(mode="json"))
        self._reject(task, verdict, VerifyStage.HUMAN,
                     VerdictGiven(stage=VerifyStage.HUMAN, passed=False, verifier=person, feedback=verdict.feedback))

    def _refuse(self, override: Override, reason: str) -> None:
        task = self.run.tasks.get(override.task_id)
        if not self.finished:
            self._emit(task, OverrideRefused(action=override.action, reason=reason), actor=override.by)
        self._effects.append(Refused(reason))

    def _cancel(self, task_id: str, by: str, reason: str) -> None:
        if task_id and task_id not in self.run.tasks:
            self._effects.append(Refused(f"run {self.run.run_id!r} has no task {task_id!r}"))
            return
        targets = [self.run.tasks[task_id]] if task_id else list(self.run.tasks.values())
        for task in targets:
            if not task.terminal:
                self._transition(task, TaskEvent.CANCEL, actor=by, reason=reason)
        self._effects.append(StopWork(task_id, reason, by))

    # -- the world ------------------------------------------------------------------------------

    def _presence(self, served: frozenset[str]) -> None:
        changed = served != self._served
        self._served = served
        if changed:
            for task in self.run.tasks.values():
                if not task.terminal:
                    self._touch(task)
        limit = self.run.job.budget.no_worker_s
        for task_id, since in list(self._worker_wait.items()):
            task = self.run.tasks[task_id]
            if task.terminal or task.capability in served or self._now.mono - since < limit:
                continue
            self._transition(task, TaskEvent.EXHAUST, guard="no_worker",
                             reason=f"no live worker serves capability {task.capability!r}; waited "
                                    f"{self._now.mono - since:.0f} s (budget.no_worker_s is {limit:g})")

    def _dead_lettered(self, letter: DeadLettered) -> None:
        task = self.run.tasks.get(letter.task_id)
        if task is None or task.attempt != letter.attempt or task.terminal:
            return
        self._transition(task, TaskEvent.EXHAUST, guard="dead_letter",
                         reason=f"dead-lettered by the bus: {letter.reason}")

    def _redrive(self) -> None:
        for task in list(self.run.tasks.values()):
            if task.terminal:
                continue
            if task.state is TaskState.NOT_DONE and task.attempt > 0:
                if task.id in self._retry_at or (task.waiting is not None and task.waiting.for_ == "retry"):
                    self._retry_at.pop(task.id, None)
                    self._dispatch(task)
                else:
                    self._effects.append(SendAssign(task.id))
            elif task.state is TaskState.DONE:
                self._transition(task, TaskEvent.VERIFY)
                self._next_check(task, after=None)
            elif task.state is TaskState.VERIFY_DONE:
                stage = task.verify_stage
                if stage is None or stage is VerifyStage.SPEC:
                    self._next_check(task, after=None)
                elif stage is not VerifyStage.HUMAN:
                    self._effects.append(RequestCheck(task.id, task.attempt, stage))
            elif task.state is TaskState.REDO:
                self._transition(task, TaskEvent.REDISPATCH)
                self._dispatch(task)

    # -- after every input ----------------------------------------------------------------------

    def _settle(self) -> None:
        """Cancel dependents of tasks that ended badly, dispatch what became ready, end the run when done.

        Only the dependents of tasks that ended since the last settle are looked at, so an input
        costs work in proportion to its task's fan-out, not to the size of the run.
        """
        run = self.run
        while self._ended and run.state is RunState.RUNNING:
            ended = run.tasks[self._ended.pop()]
            for dependent_id in self._dependents.get(ended.id, ()):
                dependent = run.tasks[dependent_id]
                if ended.state is TaskState.ACCEPTED:
                    if self._ready(dependent):
                        self._go(dependent)
                    else:
                        self._touch(dependent)
                elif not dependent.terminal:
                    self._transition(dependent, TaskEvent.CANCEL, reason=f"dependency {ended.id!r} {ended.state}")
        if run.state is RunState.RUNNING:
            self._release()
            self._say_held()
        if run.state is RunState.RUNNING and self._unfinished == 0:
            self._finish()

    def _finish(self) -> None:
        run = self.run
        states = {t.state for t in run.tasks.values()}
        if states <= {TaskState.ACCEPTED}:
            run.state = RunState.ACCEPTED
        elif TaskState.FAILED in states:
            run.state = RunState.FAILED
            failed = next(t for t in run.tasks.values() if t.state is TaskState.FAILED)
            run.reason = run.reason or f"task {failed.id!r} failed: {failed.reason}"
        else:
            run.state = RunState.CANCELLED
            run.reason = run.reason or "cancelled"
        run.finished = self._now.wall
        self._emit(None, RunFinished(state=run.state, reason=run.reason))
        self._effects.append(Ended(run.state, run.reason))

    def _exhaust_run(self, reason: str, *, guard: Guard) -> None:
        self.run.reason = reason
        for task in self.run.tasks.values():
            if not task.terminal:
                self._transition(task, TaskEvent.EXHAUST, guard=guard, reason=reason)
        self._effects.append(StopWork("", reason, self.actor))

    def _update_waiting(self) -> None:
        """Say, for each task that may have changed, whether it moves or what it waits for."""
        touched, self._touched = self._touched, {}
        for task_id in touched:
            task = self.run.tasks[task_id]
            waiting = self._waiting_of(task)
            if waiting is None:
                self._worker_wait.pop(task_id, None)
            elif waiting.for_ == "worker":
                self._worker_wait.setdefault(task_id, self._now.mono)
            before = task.waiting
            if before == waiting or (before is not None and waiting is not None and before.same_wait(waiting)):
                continue  # still moving, or still waiting for the same thing since then
            task.waiting = waiting
            if not task.terminal:
                self._emit(task, WaitingChanged(waiting=waiting))

    def _waiting_of(self, task: TaskRecord) -> Waiting | None:
        if task.terminal or self.finished:
            return None
        since = self._now.wall
        if task.state is TaskState.NOT_DONE:
            if task.id in self._retry_at:
                return Waiting(for_="retry", since=since)
            if task.attempt == 0:
                pending = tuple(d for d in task.depends_on if self.run.tasks[d].state is not TaskState.ACCEPTED)
                return Waiting(for_="dependency", since=since, on=pending) if pending else None
            return self._worker_waiting(task, since)
        if task.state is TaskState.VERIFY_DONE:
            if task.verify_stage is VerifyStage.HUMAN:
                return Waiting(for_="person", since=since)
            if task.verify_stage is VerifyStage.WORKER:
                return self._worker_waiting(task, since)
        return None

    def _worker_waiting(self, task: TaskRecord, since: float) -> Waiting | None:
        if self._served is None or task.capability in self._served:
            return None
        return Waiting(for_="worker", since=since, capability=task.capability)

    # -- the one place state changes ------------------------------------------------------------

    def _transition(self, task: TaskRecord, event: TaskEvent, *, actor: str = "", reason: str = "",
                    guard: Guard | None = None, output: Any = None, tokens: int = 0, duration_s: float = 0.0,
                    error: str = "", verdict: VerdictGiven | None = None) -> None:
        before = task.state
        task.state = transition(task.state, event, task_id=task.id)
        if task.terminal:
            self._unfinished -= 1
            self._ended.append(task.id)
            if task.attempt:
                self._in_flight -= 1
            else:
                self._held_ids.discard(task.id)
            task.verify_stage = None
            self._retry_at.pop(task.id, None)
        if reason:
            task.reason = reason
        if reason or guard or output is not None or tokens or duration_s or error:
            body = Transitioned(event=event, from_state=before, to_state=task.state, reason=reason, guard=guard,
                                output=output, tokens=tokens, duration_s=duration_s, error=error, verdict=verdict)
        else:
            body = _bare_transition(event, before, task.state, verdict)
        self._emit(task, body, actor=actor)
        self._touch(task)

    def _emit(self, task: TaskRecord | None, body: HistoryBody, *, actor: str = "") -> None:
        run = self.run
        event = HistoryEvent(
            seq=run.next_seq, run_id=run.run_id, task_id=task.id if task else "", attempt=task.attempt if task else 0,
            time=self._now.wall, actor=actor or self.actor, body=body)
        run.next_seq += 1
        self._effects.append(event)

    def _touch(self, task: TaskRecord) -> None:
        self._touched[task.id] = None

    def _ignore(self, reason: str, *, suspicious: bool = False) -> None:
        self._effects.append(Ignored(reason, suspicious))

    def _plan(self, task: TaskRecord) -> str:
        deps = f" It builds on {', '.join(task.depends_on)}." if task.depends_on else ""
        return f"Goal: {self.run.goal}. This task ({task.id}): {task.instruction}.{deps}"


_SHARED_KEPT = 256  # entries of each table of shared values: verifiers name people too, so keep them bounded
_K = TypeVar("_K")
_V = TypeVar("_V")


def _shared(table: dict[_K, _V], key: _K, make: Callable[[], _V]) -> _V:
    """The one value for ``key`` in ``table``, made the first time; made each time once the table is full."""
    value = table.get(key)
    if value is None:
        value = make()
        if len(table) < _SHARED_KEPT:
            table[key] = value
    return value


def _plain(verdict: Verdict | VerdictGiven) -> bool:
    """Whether the verdict says nothing but who gave it and whether it passed."""
    return not (verdict.feedback or verdict.corrections or verdict.tokens)


# History bodies are frozen, so the ones that say nothing but their kind (a dispatch to a capability, a plain
# verdict, a transition with no reason, output or cost: most of a task's) are one instance each, shared by every
# task that makes them. Each was a pydantic model validated per task: five of the nine a task with a passing spec
# check made.
_SPEC_PASSED = Verdict(passed=True, verifier="spec")  # every passing data check's verdict
_DISPATCHED: dict[str, Dispatched] = {}
_PLAIN_GIVEN: dict[tuple[VerifyStage, bool, str], VerdictGiven] = {}
_BARE_TRANSITIONS: dict[tuple[TaskEvent, TaskState, TaskState, VerdictGiven | None], Transitioned] = {}
_PLAIN_VERDICTS: dict[Verdict, dict[str, Any]] = {}


def _dispatched(capability: str) -> Dispatched:
    """The body of a dispatch to ``capability``: one per capability."""
    return _shared(_DISPATCHED, capability, lambda: Dispatched(capability=capability))


def _verdict_given(stage: VerifyStage, verdict: Verdict) -> VerdictGiven:
    """The history's record of ``verdict``, the shared one when it is plain."""
    verifier = verdict.verifier or str(stage)
    if not _plain(verdict):
        return VerdictGiven(stage=stage, passed=verdict.passed, verifier=verifier, feedback=verdict.feedback,
                            corrections=verdict.corrections, tokens=verdict.tokens)
    return _shared(_PLAIN_GIVEN, (stage, verdict.passed, verifier),
                   lambda: VerdictGiven(stage=stage, passed=verdict.passed, verifier=verifier))


def _bare_transition(event: TaskEvent, before: TaskState, after: TaskState,
                     verdict: VerdictGiven | None) -> Transitioned:
    """A transition body with nothing but its states and verdict; shared when the verdict is plain, or none."""
    def make() -> Transitioned:
        return Transitioned(event=event, from_state=before, to_state=after, verdict=verdict)

    if verdict is not None and not _plain(verdict):
        return make()
    return _shared(_BARE_TRANSITIONS, (event, before, after, verdict), make)


def _amend_attempt(task: TaskRecord, **changes: Any) -> None:
    """Change the task's current attempt. Attempts are frozen, so it is replaced: a copy of the task taken before
    (``TaskRecord.snapshot``, what a store keeps) shares the old one and does not see the change."""
    *earlier, current = task.attempts
    task.attempts = (*earlier, current.amended(**changes))


def _verdict_record(verdict: Verdict) -> dict[str, Any]:
    """The verdict as an attempt keeps it (a dict, read-only once recorded).

    A verdict without feedback or corrections (every passing spec check) is one dict per verifier, shared
    by the attempts it decided: one each was ~240 bytes a task of a 100,000-task run's memory.
    """
    if verdict.feedback or verdict.corrections:
        return verdict.model_dump(mode="json")
    return _shared(_PLAIN_VERDICTS, verdict, lambda: verdict.model_dump(mode="json"))


def _clip(value: Any, limit: int = _CLIP_CHARS) -> Any:
    """Small outputs as they are; large ones as the start of their text (history is for reading)."""
    try:
        text = json.dumps(value, default=repr)
    except (TypeError, ValueError, RecursionError):
        text = repr(value)
    return value if len(text) <= limit else text[:limit] + "..."


def _context(task: TaskRecord) -> str:
    text = repr(task.output)
    if len(text) > _CONTEXT_CHARS:
        text = text[:_CONTEXT_CHARS] + "..."
    return f"Attempt {task.attempt} returned: {text}"
