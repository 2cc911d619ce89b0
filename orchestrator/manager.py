"""The manager: runs task DAGs over the bus and drives every task through the state machine.

It is the single writer of run and task records. Replies arrive on each capability's result
stream; each is applied under the run's lock, recorded in the store, and only then
acknowledged, so a crash between the two redelivers the reply instead of losing it, and the
(task, attempt) check makes the second delivery a no-op.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus
from structlog.contextvars import bound_contextvars

from orchestrator.job import Job, parse_job
from orchestrator.records import AttemptRecord, Event, RunRecord, RunState, TaskRecord
from orchestrator.store import Store
from orchestrator.verifier import check_spec
from protocol.bus import Bus, Delivery
from protocol.envelope import Envelope
from protocol.errors import ConfigError, OrchestratorError
from protocol.keys import (
    CONTROL_TOPIC,
    JOBS_STREAM,
    MANAGER_GROUP,
    OVERRIDES_STREAM,
    events_stream,
    results_stream,
    run_snapshot_key,
    tasks_stream,
)
from protocol.messages import (
    Assign,
    Cancel,
    Done,
    Failed,
    Heartbeat,
    Override,
    OverrideAction,
    Progress,
    Redo,
    Submit,
    Verdict,
    VerifyRequest,
    VerifyResponse,
)
from protocol.states import TaskEvent, TaskState, transition
from protocol.tracing import Tracing, end

__all__ = ("Judge", "Manager", "ManagerObserver", "ManagerSettings")

log = structlog.get_logger("orchestrator.manager")

# An LLM (or other) judge for specs with a ``description``: (task, output) -> verdict.
Judge = Callable[[TaskRecord, Any], Awaitable[Verdict]]

# Called synchronously with every event the manager records, after it is recorded: (run, task or None, event).
# It runs on the manager's hottest path, so it must be O(1), must not block, and must not change the records.
ManagerObserver = Callable[[RunRecord, TaskRecord | None, Event], None]

_CONTEXT_CHARS = 2000
_FINISHED_LOGS_KEPT = 100


@dataclass(frozen=True, slots=True)
class ManagerSettings:
    """Manager behaviour."""

    name: str = "manager"
    tick_s: float = 0.2  # how often deadlines are checked
    incarnation_check_s: float = 1.0  # how often to look for a bus that lost its data
    snapshot_ttl_s: float = 7 * 24 * 3600.0  # how long finished runs stay visible to ``status``
    snapshot_interval_s: float = 0.5  # how often a running run's summary is refreshed for ``status``
    publish_events: bool = True  # mirror each run's history to the bus for ``events``/``watch`` elsewhere


class Manager:
    """Runs jobs: dispatches ready tasks, verifies results, sends redos, enforces budgets."""

    def __init__(self, bus: Bus, store: Store, settings: ManagerSettings | None = None, *,
                 judge: Judge | None = None, observers: Sequence[ManagerObserver] = (),
                 tracing: Tracing | None = None) -> None:
        self.bus = bus
        self.observers = tuple(observers)
        self.tracing = tracing or Tracing.detect()
        self._spans: dict[tuple[str, str], Any] = {}  # the open span of each task's current attempt (tracing on)
        self.store = store
        self.settings = settings or ManagerSettings()
        self.name = self.settings.name
        self.judge = judge
        self._runs: dict[str, RunRecord] = {}
        self._index: dict[str, _RunIndex] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._logs: dict[str, _EventLog] = {}  # live events of runs in memory, for events() and wait()
        self._consuming: set[str] = set()
        self._tg: TaskGroup | None = None
        self._incarnation = ""
        # Replies applied but not yet acknowledged: acknowledged after the store's next sync,
        # so many replies share one durable write (group commit).
        self._unacked: list[Delivery] = []
        self._touched: set[str] = set()
        self._stale_snapshots: set[str] = set()
        self._unpublished: list[Event] = []  # recorded events not yet mirrored to the bus
        self._dead_seen: dict[str, int] = {}  # dead letters already looked at, per task stream
        self._wake_acker = anyio.Event()

    # -- lifecycle -------------------------------------------------------------------------

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; ready to accept ``submit`` once started."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self._incarnation = await self.bus.incarnation()
            await self._resume()
            tg.start_soon(self._watch_deadlines)
            tg.start_soon(self._watch_bus)
            tg.start_soon(self._acknowledge)
            tg.start_soon(self._consume_jobs)
            tg.start_soon(self._consume_overrides)
            tg.start_soon(self._refresh_snapshots)
            log.info("manager_started", manager=self.name, resumed=len(self._runs))
            task_status.started()
            await anyio.sleep_forever()

    # -- public operations -----------------------------------------------------------------

    async def submit(self, job: Job, *, run_id: str | None = None) -> str:
        """Start a run of ``job``; returns its run id at once. Submitting a known run id again is a no-op."""
        if run_id is not None and (run_id in self._runs or await self.store.get_run(run_id) is not None):
            return run_id
        run = RunRecord.new(job, run_id)
        self._track(run)
        await self.store.create_run(run)
        async with self._lock(run.run_id):
            tasks = [{"id": t.id, "capability": t.capability, "depends_on": list(t.depends_on)} for t in job.tasks]
            await self._emit(run, None, kind="run", event="run_started", detail={"goal": job.goal, "tasks": tasks})
            if not run.tasks:
                await self._finish_run(run)
            await self._dispatch_ready(run)
        await self._publish_snapshot(run)
        return run.run_id

    def _track(self, run: RunRecord) -> None:
        self._index[run.run_id] = _RunIndex.of(run)
        self._runs[run.run_id] = run
        self._logs[run.run_id] = _EventLog(first_seq=run.next_seq)
        while len(self._logs) > _FINISHED_LOGS_KEPT and (oldest := next(iter(self._logs))) not in self._runs:
            del self._logs[oldest]
        for capability in {t.capability for t in run.tasks.values()}:
            self._consume_results_of(capability)

    async def wait(self, run_id: str) -> RunRecord:
        """Block until the run ends; returns its final record."""
        if run_id in self._logs:
            while not self._logs[run_id].finished:
                await self._logs[run_id].next_change().wait()
        else:
            async for _ in self.events(run_id):
                pass
        await self.store.sync()
        run = await self.store.get_run(run_id)
        if run is None:
            raise ConfigError(f"unknown run {run_id!r}")
        return run

    async def events(self, run_id: str, after: int = 0) -> AsyncIterator[Event]:
        """The run's history from ``after``, then new events as they happen, until the run ends.

        Runs this manager has in memory are served from memory; others from the store's history.
        """
        log_ = self._logs.get(run_id)
        if log_ is None:
            if await self.store.get_run(run_id) is None:
                raise ConfigError(f"unknown run {run_id!r}")
            for event in await self.store.events(run_id, after):
                yield event
            return
        if log_.first_seq > after + 1:  # a resumed run: the part before this manager comes from the store
            for event in await self.store.events(run_id, after):
                if event.seq >= log_.first_seq:
                    break
                after = event.seq
                yield event
        while True:
            batch = log_.since(after)
            for event in batch:
                after = event.seq
                yield event
            if batch:
                continue  # the consumer may have awaited between yields: look again before waiting
            if log_.finished:
                return
            await log_.next_change().wait()

    async def cancel(self, run_id: str, task_id: str | None = None, *, by: str = "api", reason: str = "") -> None:
        """Cancel one task, or every unfinished task of the run."""
        run = self._live(run_id)
        if task_id and task_id not in run.tasks:
            raise ConfigError(f"run {run_id!r} has no task {task_id!r}")
        reason = reason or f"cancelled by {by}"
        async with self._lock(run_id):
            targets = [run.tasks[task_id]] if task_id else list(run.tasks.values())
            for task in targets:
                if not task.terminal:
                    await self._apply(run, task, TaskEvent.CANCEL, actor=by, reason=reason)
            await self.bus.broadcast(CONTROL_TOPIC, Envelope(run_id=run_id, task_id=task_id or "", sender=self.name,
                                                             body=Cancel(reason=reason, by=by)))
            await self._settle(run)
        await self.store.sync()
        await self._publish_snapshot(run)

    async def override(self, run_id: str, task_id: str, action: OverrideAction, *, feedback: str = "",
                       by: str = "api") -> None:
        """A person's decision about a task: approve, reject (with feedback), redo, accept or cancel.

        Raises ConfigError naming the run, task and state when the action does not apply.
        """
        run = self._live(run_id)
        if action == "cancel":
            await self.cancel(run_id, task_id or None, by=by, reason=feedback or f"cancelled by {by}")
            return
        task = run.tasks.get(task_id)
        if task is None:
            raise ConfigError(f"run {run_id!r} has no task {task_id!r}")
        async with self._lock(run_id):
            await self._emit(run, task, kind="override", event=action, actor=by, detail={"feedback": feedback})
            await self._apply_override(run, task, action, feedback, by)
            await self._settle(run)
        await self.store.sync()
        await self._publish_snapshot(run)

    async def _apply_override(self, run: RunRecord, task: TaskRecord, action: OverrideAction, feedback: str,
                              by: str) -> None:
        person = f"person:{by}"
        state, stage = task.state, task.verify_stage
        if action == "approve" and state is TaskState.VERIFY_DONE and stage == "human":
            await self._apply(run, task, TaskEvent.PASS, actor=by, detail={"verifier": person})
        elif action == "accept" and state in (TaskState.DONE, TaskState.VERIFY_DONE):
            if state is TaskState.DONE:
                await self._apply(run, task, TaskEvent.VERIFY, actor=by)
            await self._apply(run, task, TaskEvent.PASS, actor=by, detail={"verifier": person})
        elif action in ("reject", "redo") and state in (TaskState.DONE, TaskState.VERIFY_DONE):
            if state is TaskState.DONE:
                await self._apply(run, task, TaskEvent.VERIFY, actor=by)
            await self._reject(run, task, Verdict(passed=False, verifier=person,
                                                  feedback=feedback or f"rejected by {by}"))
        elif action == "redo" and state is TaskState.NOT_DONE and task.attempt > 0:
            # Stop the attempt in flight; the next one carries the person's feedback.
            await self.bus.broadcast(CONTROL_TOPIC, Envelope(run_id=run.run_id, task_id=task.id, sender=self.name,
                                                             body=Cancel(reason=f"redo requested by {by}", by=by)))
            task.redo.append(Redo(plan=_plan(run, task), context=_context(task), feedback=feedback))
            await self._apply(run, task, TaskEvent.RETRY, actor=by, detail={"feedback": feedback})
            await self._dispatch(run, task)
        elif action == "redo" and state in (TaskState.NOT_DONE, TaskState.REDO):
            # Not started yet, or about to be redone: the next attempt carries the feedback too.
            task.redo.append(Redo(plan=_plan(run, task), context=_context(task), feedback=feedback))
        else:
            waiting = " (waiting for approval)" if state is TaskState.VERIFY_DONE and stage == "human" else ""
            raise ConfigError(f"cannot {action} task {task.id!r} of run {run.run_id!r} in state "
                              f"{str(state)!r}{waiting}")

    @property
    def capabilities(self) -> frozenset[str]:
        """The capabilities this manager has sent tasks to (whose streams it reads)."""
        return frozenset(self._consuming)

    def snapshot(self, run_id: str) -> RunRecord:
        """The live record of a run this manager is running (a copy)."""
        return self._live(run_id).model_copy(deep=True)

    # -- replies -----------------------------------------------------------------------------

    def _consume_results_of(self, capability: str) -> None:
        if capability in self._consuming:
            return
        if self._tg is None:
            raise RuntimeError("Manager.serve() must be running before submit()")
        self._consuming.add(capability)
        self._tg.start_soon(self._consume_results, capability)

    async def _consume_results(self, capability: str) -> None:
        async for delivery in self.bus.consume(results_stream(capability), group=MANAGER_GROUP, consumer=self.name):
            try:
                await self._on_delivery(delivery)
            except Exception:
                # redelivered and, if it keeps failing, dead-lettered by the bus.
                log.exception("reply_processing_failed", run_id=delivery.envelope.run_id,
                              task_id=delivery.envelope.task_id, type=delivery.envelope.type)
                continue
            self._defer_ack(delivery)

    def _defer_ack(self, delivery: Delivery) -> None:
        self._unacked.append(delivery)
        self._touched.add(delivery.envelope.run_id)
        self._wake_acker.set()

    async def _acknowledge(self) -> None:
        """Acknowledge applied replies once the store has made their effects durable."""
        while True:
            await self._wake_acker.wait()
            self._wake_acker = anyio.Event()
            batch, self._unacked = self._unacked, []
            touched, self._touched = self._touched, set()
            events, self._unpublished = self._unpublished, []
            await self.store.sync()
            async with anyio.create_task_group() as tg:  # concurrent writes share the bus's round trips
                tg.start_soon(self.bus.ack_many, batch)
                for run_id, chunks in _by_run(events).items():  # followers see only what is durable
                    tg.start_soon(self._publish_history, run_id, chunks)
            self._stale_snapshots |= touched

    async def _consume_jobs(self) -> None:
        """Start runs submitted by other processes (``orchestrator submit``)."""
        async for delivery in self.bus.consume(JOBS_STREAM, group=MANAGER_GROUP, consumer=self.name):
            env = delivery.envelope
            if isinstance(env.body, Submit):
                try:
                    job = parse_job(env.body.job, source=env.body.source or None)
                    await self.submit(job, run_id=env.run_id or None)
                except Exception as exc:
                    # The submitter validated the job; a job that still fails here is recorded as a failed run.
                    log.warning("submitted_job_rejected", run_id=env.run_id, error=str(exc))
                    await self._record_rejected(env.run_id, env.body, str(exc))
            await self.store.sync()
            await self.bus.ack(delivery)

    async def _consume_overrides(self) -> None:
        """Apply overrides sent by people from any machine (``orchestrator approve`` and friends)."""
        async for delivery in self.bus.consume(OVERRIDES_STREAM, group=MANAGER_GROUP, consumer=self.name):
            env = delivery.envelope
            if isinstance(env.body, Override):
                try:
                    await self.override(env.run_id, env.task_id, env.body.action, feedback=env.body.feedback,
                                        by=env.body.by or env.sender)
                except Exception as exc:  # a person's bad request must not stop the manager
                    log.warning("override_refused", run_id=env.run_id, task_id=env.task_id, action=env.body.action,
                                by=env.body.by, reason=str(exc), error_type=type(exc).__name__)
                    await self._note_refused(env, str(exc))
            await self.store.sync()
            await self.bus.ack(delivery)

    async def _note_refused(self, env: Envelope, reason: str) -> None:
        run = self._runs.get(env.run_id)
        if run is None or not isinstance(env.body, Override):
            return
        async with self._lock(run.run_id):
            await self._emit(run, run.tasks.get(env.task_id), kind="override", event="refused", actor=env.body.by,
                             detail={"action": env.body.action, "reason": reason})

    async def _record_rejected(self, run_id: str, submit: Submit, reason: str) -> None:
        goal = str(submit.job.get("goal") or "(invalid job)")
        run = RunRecord.new(Job(goal=goal), run_id or None)
        run.state, run.reason, run.finished = RunState.FAILED, f"invalid job: {reason}", time.time()
        await self.store.create_run(run)
        await self._publish_snapshot(run)

    async def _publish_final(self, run: RunRecord) -> None:
        """A finished run's summary, once its end is durable, so ``status`` never reports an end it could lose.

        Then the manager lets the run go: the store has it, and its events stay in memory a while for followers.
        """
        await self.store.sync()
        await self._publish_snapshot(run)
        if self.settings.publish_events:
            await self.bus.expire(events_stream(run.run_id), self.settings.snapshot_ttl_s)
        for table in (self._runs, self._index, self._locks):
            table.pop(run.run_id, None)

    async def _publish_history(self, run_id: str, chunks: list[list[Event]]) -> None:
        for chunk in chunks:  # in order: a follower reads the stream as the run's history
            await self.bus.publish(events_stream(run_id), Event.to_envelope(run_id, chunk, self.name))

    async def _refresh_snapshots(self) -> None:
        """Refresh the summaries of runs that changed; a summary of a big run is too costly for every reply."""
        while True:
            await anyio.sleep(self.settings.snapshot_interval_s)
            stale, self._stale_snapshots = self._stale_snapshots, set()
            for run_id in stale:
                if run_id in self._runs:
                    await self._publish_snapshot(self._runs[run_id])

    async def _publish_snapshot(self, run: RunRecord) -> None:
        data = json.dumps(run.summary(), default=str).encode()
        await self.bus.put_value(run_snapshot_key(run.run_id), data, ttl_s=self.settings.snapshot_ttl_s)

    async def _on_delivery(self, delivery: Delivery) -> None:
        env = delivery.envelope
        run = self._runs.get(env.run_id)
        if run is None:
            log.info("reply_for_unknown_run_dropped", run_id=env.run_id, type=env.type)
            return
        task = run.tasks.get(env.task_id)
        if task is None:
            log.warning("reply_for_unknown_task_dropped", run_id=env.run_id, task_id=env.task_id)
            return
        with bound_contextvars(run_id=env.run_id, task_id=env.task_id, attempt=env.attempt):
            async with self._lock(run.run_id):
                await self._on_reply(run, task, env)
                await self._settle(run)

    async def _on_reply(self, run: RunRecord, task: TaskRecord, env: Envelope) -> None:
        body = env.body
        if isinstance(body, Heartbeat):
            task.worker = env.sender
            return
        if isinstance(body, Progress):
            await self._emit(run, task, kind="progress", event="progress", actor=env.sender,
                             detail={"message": body.message, "fraction": body.fraction})
            return
        if env.attempt != task.attempt:
            log.info("stale_reply_ignored", type=env.type, current_attempt=task.attempt)
            return
        if isinstance(body, Done) and task.state is TaskState.NOT_DONE:
            await self._on_done(run, task, env, body)
        elif isinstance(body, Failed) and task.state is TaskState.NOT_DONE:
            await self._on_failed(run, task, env, body)
        elif isinstance(body, VerifyResponse) and task.state is TaskState.VERIFY_DONE and task.verify_stage == "worker":
            await self._on_verdict(run, task, body.verdict, after="worker")
        else:
            # A duplicate delivery, or a reply that lost a race with a cancel: nothing to do.
            log.info("duplicate_reply_ignored", type=env.type, state=str(task.state))

    async def _on_done(self, run: RunRecord, task: TaskRecord, env: Envelope, done: Done) -> None:
        task.worker = env.sender
        task.tokens += done.tokens
        run.tokens += done.tokens
        rejected = [a for a in task.attempts[:-1] if a.verdict is not None and not a.verdict["passed"]]
        previous = rejected[-1].output if rejected else _MISSING
        task.output = done.output
        current = task.attempts[-1]
        current.output, current.worker, current.finished = done.output, env.sender, time.time()
        await self._apply(run, task, TaskEvent.DONE, actor=env.sender,
                          detail={"output": _clip(done.output), "duration_s": round(done.duration_s, 4),
                                  "tokens": done.tokens})
        if await self._over_token_budget(run, task):
            return
        if previous is not _MISSING and done.output == previous:
            await self._apply(run, task, TaskEvent.EXHAUST, actor=self.name, guard="loop",
                              reason=f"loop: attempt {task.attempt} returned the same output as attempt "
                                     f"{rejected[-1].attempt}, which had failed verification")
            return
        task.self_check = done.self_check
        await self._apply(run, task, TaskEvent.VERIFY, actor=self.name)
        await self._verify(run, task)

    async def _verify(self, run: RunRecord, task: TaskRecord) -> None:
        """Run the spec's checks, then hand over to the worker's own check when it has one."""
        task.verify_stage = "spec"
        verdict = await check_spec(task.spec, task.output, task)
        if verdict.passed and task.self_check:
            task.verify_stage = "worker"
            await self._request_worker_verify(run, task)
            return
        await self._on_verdict(run, task, verdict, after="worker" if verdict.passed else "spec")

    async def _request_worker_verify(self, run: RunRecord, task: TaskRecord) -> None:
        await self.bus.publish(tasks_stream(task.capability), Envelope(
            run_id=run.run_id, task_id=task.id, attempt=task.attempt, sender=self.name, trace=self._trace(run, task),
            body=VerifyRequest(capability=task.capability, instruction=task.instruction, input=task.input,
                               output=task.output, spec_description=task.spec.description)))

    async def _on_verdict(self, run: RunRecord, task: TaskRecord, verdict: Verdict, *, after: str) -> None:
        """Continue the verification chain (spec -> worker -> judge) or act on a failure."""
        task.attempts[-1].verdict = verdict.model_dump(mode="json")
        if verdict.tokens:
            task.tokens += verdict.tokens
            run.tokens += verdict.tokens
            if await self._over_token_budget(run, task):
                return
        if not verdict.passed:
            await self._reject(run, task, verdict)
            return
        if after in ("spec", "worker") and task.spec.description and self.judge is not None:
            task.verify_stage = "judge"
            assert self._tg is not None
            self._tg.start_soon(self._run_judge, run, task, task.attempt)
            return
        if after != "human" and task.spec.approval == "human":
            task.verify_stage = "human"  # waits in verify_done until a person approves or rejects
            await self._emit(run, task, kind="note", event="awaiting_approval", actor=self.name,
                             detail={"verifier": verdict.verifier})
            return
        await self._apply(run, task, TaskEvent.PASS, actor=verdict.verifier or self.name,
                          detail={"verifier": verdict.verifier, "feedback": verdict.feedback})

    async def _run_judge(self, run: RunRecord, task: TaskRecord, attempt: int) -> None:
        assert self.judge is not None
        try:
            verdict = await self.judge(task, task.output)
        except Exception as exc:
            verdict = Verdict(passed=False, verifier="judge", feedback=f"judge failed: {type(exc).__name__}: {exc}")
        async with self._lock(run.run_id):
            if task.attempt == attempt and task.state is TaskState.VERIFY_DONE:
                await self._on_verdict(run, task, verdict, after="judge")
                await self._settle(run)
        await self.store.sync()
        await self._publish_snapshot(run)

    async def _over_token_budget(self, run: RunRecord, task: TaskRecord) -> bool:
        """Fail the task (or the whole run) whose token budget is spent; True when it did."""
        if task.max_tokens is not None and task.tokens > task.max_tokens:
            await self._apply(run, task, TaskEvent.EXHAUST, actor=self.name, guard="tokens",
                              reason=f"token budget spent: task used {task.tokens} tokens of {task.max_tokens}")
            return True
        budget = run.job.budget.max_tokens
        if budget is not None and run.tokens > budget:
            await self._exhaust_run(run, f"token budget spent: run used {run.tokens} tokens of {budget}",
                                    guard="tokens")
            return True
        return False

    async def _reject(self, run: RunRecord, task: TaskRecord, verdict: Verdict) -> None:
        await self._apply(run, task, TaskEvent.REJECT, actor=verdict.verifier or self.name,
                          detail={"verifier": verdict.verifier, "feedback": verdict.feedback,
                                  "corrections": list(verdict.corrections)})
        repeated = bool(task.redo) and bool(verdict.feedback) and task.redo[-1].feedback == verdict.feedback
        task.redo.append(Redo(plan=_plan(run, task), context=_context(task), feedback=verdict.feedback,
                              corrections=verdict.corrections))
        if repeated and not verdict.verifier.startswith("person:"):
            # The worker is not converging: the same objection twice means another attempt is wasted budget.
            await self._apply(run, task, TaskEvent.EXHAUST, actor=self.name, guard="repeated_feedback",
                              reason=f"stuck: attempts {task.attempt - 1} and {task.attempt} got the same feedback: "
                                     f"{verdict.feedback}")
            return
        if task.attempt >= task.max_attempts:
            await self._apply(run, task, TaskEvent.EXHAUST, actor=self.name, guard="attempts",
                              reason=f"failed verification on all {task.max_attempts} attempts; last feedback: "
                                     f"{verdict.feedback}")
            return
        await self._apply(run, task, TaskEvent.REDISPATCH, actor=self.name)
        await self._dispatch(run, task)

    async def _on_failed(self, run: RunRecord, task: TaskRecord, env: Envelope, failed: Failed) -> None:
        task.worker = env.sender
        current = task.attempts[-1]
        current.error, current.worker, current.finished = failed.error, env.sender, time.time()
        if failed.retryable and task.attempt < task.max_attempts:
            await self._apply(run, task, TaskEvent.RETRY, actor=env.sender, detail={"error": failed.error})
            await self._dispatch(run, task)
            return
        why = "not retryable" if not failed.retryable else f"attempt {task.attempt} of {task.max_attempts}"
        await self._apply(run, task, TaskEvent.EXHAUST, actor=env.sender, guard="attempts" if failed.retryable else "",
                          reason=f"worker failed ({why}): {failed.error}")

    # -- scheduling --------------------------------------------------------------------------

    async def _dispatch_ready(self, run: RunRecord, candidates: Iterable[TaskRecord] | None = None) -> None:
        ready = [task for task in (run.tasks.values() if candidates is None else candidates)
                 if task.attempt == 0 and task.state is TaskState.NOT_DONE
                 and all(run.tasks[d].state is TaskState.ACCEPTED for d in task.depends_on)]
        for task in ready:
            await self._next_attempt(run, task)
        await self._publish_assigns(run, ready)

    async def _dispatch(self, run: RunRecord, task: TaskRecord) -> None:
        await self._next_attempt(run, task)
        await self._publish_assign(run, task)

    async def _next_attempt(self, run: RunRecord, task: TaskRecord) -> None:
        task.attempt += 1
        task.verify_stage = ""
        task.attempts.append(AttemptRecord(attempt=task.attempt))
        if self.tracing.enabled:
            self._trace_attempt(run, task)
        await self._emit(run, task, kind="dispatch", event="dispatched", actor=self.name,
                         detail={"capability": task.capability})

    def _trace_attempt(self, run: RunRecord, task: TaskRecord) -> None:
        """Start the span of the task's new attempt (ending the previous one): its context travels in envelopes."""
        key = (run.run_id, task.id)
        end(self._spans.pop(key, None), attributes={"orchestrator.outcome": "redone"})
        self._spans[key] = self.tracing.start(
            f"attempt {task.capability}", kind="producer",
            attributes={"orchestrator.run_id": run.run_id, "orchestrator.task_id": task.id,
                        "orchestrator.attempt": task.attempt, "orchestrator.capability": task.capability})

    def _trace(self, run: RunRecord, task: TaskRecord) -> dict[str, str]:
        """The trace context for envelopes about the task's current attempt (empty with tracing off)."""
        if not self.tracing.enabled:
            return {}
        return self.tracing.inject(self._spans.get((run.run_id, task.id)))

    async def _publish_assign(self, run: RunRecord, task: TaskRecord) -> None:
        await self.bus.publish(tasks_stream(task.capability), self._assign(run, task))

    def _assign(self, run: RunRecord, task: TaskRecord) -> Envelope:
        body = Assign(capability=task.capability, instruction=task.instruction, input=task.input, config=task.config,
                      spec_description=task.spec.description, timeout_s=task.timeout_s, redo=tuple(task.redo),
                      dependencies={d: run.tasks[d].output for d in task.depends_on})
        return Envelope(run_id=run.run_id, task_id=task.id, attempt=task.attempt, sender=self.name,
                        trace=self._trace(run, task), body=body)

    async def _publish_assigns(self, run: RunRecord, tasks: list[TaskRecord]) -> None:
        """Publish many assigns at once, per capability: the bus sends them together."""
        by_capability: dict[str, list[Envelope]] = {}
        for task in tasks:
            by_capability.setdefault(task.capability, []).append(self._assign(run, task))
        for capability, envelopes in by_capability.items():
            await self.bus.publish_many(tasks_stream(capability), envelopes)

    async def _settle(self, run: RunRecord) -> None:
        """After a change: cancel dependents of failed tasks, dispatch what became ready, end the run if done.

        Only the dependents of tasks that ended since the last settle are looked at, so a reply costs
        work in proportion to its task's fan-out, not to the size of the run.
        """
        index = self._index.get(run.run_id)
        if index is None:  # finished and let go
            return
        while index.ended and run.state is RunState.RUNNING:
            ended = run.tasks[index.ended.pop()]
            dependents = [run.tasks[d] for d in index.dependents.get(ended.id, ())]
            if ended.state is TaskState.ACCEPTED:
                await self._dispatch_ready(run, dependents)
                continue
            for task in dependents:
                if not task.terminal:
                    await self._apply(run, task, TaskEvent.CANCEL, actor=self.name,
                                      reason=f"dependency {ended.id!r} {ended.state}")
        if run.state is RunState.RUNNING and index.unfinished == 0:
            await self._finish_run(run)

    async def _finish_run(self, run: RunRecord) -> None:
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
        run.finished = time.time()
        await self._emit(run, None, kind="run", event="run_finished",
                         detail={"state": str(run.state), "reason": run.reason})
        assert self._tg is not None
        self._tg.start_soon(self._publish_final, run)
        log.info("run_finished", run_id=run.run_id, state=str(run.state), reason=run.reason)

    async def _exhaust_run(self, run: RunRecord, reason: str, *, guard: str) -> None:
        run.reason = reason
        for task in run.tasks.values():
            if not task.terminal:
                await self._apply(run, task, TaskEvent.EXHAUST, actor=self.name, reason=reason, guard=guard)
        await self.bus.broadcast(CONTROL_TOPIC, Envelope(run_id=run.run_id, sender=self.name,
                                                         body=Cancel(reason=reason, by=self.name)))

    async def _resume(self) -> None:
        """Pick up the runs a previous manager left unfinished, and re-drive their in-flight tasks."""
        for run in await self.store.running_runs():
            self._track(run)
            async with self._lock(run.run_id):
                await self._redrive(run)
                await self._settle(run)
            log.info("run_resumed", run_id=run.run_id)

    async def _redrive(self, run: RunRecord) -> None:
        """Send again whatever a task waits for. Duplicates are harmless: replies are applied once per attempt."""
        await self._publish_assigns(run, [t for t in run.tasks.values()
                                          if t.state is TaskState.NOT_DONE and t.attempt > 0])
        for task in run.tasks.values():
            if task.state is TaskState.DONE:
                await self._apply(run, task, TaskEvent.VERIFY, actor=self.name)
                await self._verify(run, task)
            elif task.state is TaskState.VERIFY_DONE:
                if task.verify_stage == "worker":
                    await self._request_worker_verify(run, task)
                elif task.verify_stage == "judge" and self._tg is not None:
                    self._tg.start_soon(self._run_judge, run, task, task.attempt)
                else:
                    await self._verify(run, task)
            elif task.state is TaskState.REDO:
                await self._apply(run, task, TaskEvent.REDISPATCH, actor=self.name)
                await self._dispatch(run, task)

    async def _watch_bus(self) -> None:
        """Fail tasks the bus dead-lettered, and when the bus lost its data (Redis restarted empty), send
        the in-flight messages again."""
        while True:
            await anyio.sleep(self.settings.incarnation_check_s)
            try:
                current = await self.bus.incarnation()
            except OrchestratorError as exc:
                log.warning("bus_unreachable", error=str(exc))
                continue
            await self._check_dead_letters()
            if current == self._incarnation:
                continue
            log.warning("bus_data_lost", previous=self._incarnation, current=current)
            self._incarnation = current
            for run in list(self._runs.values()):
                if run.state is RunState.RUNNING:
                    async with self._lock(run.run_id):
                        await self._redrive(run)
                        await self._settle(run)
                    await self._publish_snapshot(run)

    async def _check_dead_letters(self) -> None:
        """Fail the tasks whose messages the bus gave up on (poison), instead of letting their runs hang."""
        for capability in list(self._consuming):
            stream = tasks_stream(capability)
            count = await self.bus.dead_letter_count(stream)  # cheap: most of the time nothing is new
            seen = min(self._dead_seen.get(stream, 0), count)  # fewer than seen: trimmed, or the bus lost its data
            self._dead_seen[stream] = count
            for letter in await self.bus.dead_letters(stream, last=count - seen):
                try:
                    env = self.bus.settings.codec.decode(letter.frame)
                except OrchestratorError:
                    continue  # garbage that never was a task of ours
                run = self._runs.get(env.run_id)
                task = run.tasks.get(env.task_id) if run else None
                if run is None or task is None or task.attempt != env.attempt or task.terminal:
                    continue
                async with self._lock(run.run_id):
                    if task.attempt == env.attempt and not task.terminal:
                        await self._apply(run, task, TaskEvent.EXHAUST, actor=self.name, guard="dead_letter",
                                          reason=f"dead-lettered by the bus: {letter.reason}")
                        await self._settle(run)

    async def _watch_deadlines(self) -> None:
        while True:
            await anyio.sleep(self.settings.tick_s)
            now = time.time()
            for run in list(self._runs.values()):
                if run.state is RunState.RUNNING and now >= run.deadline:
                    async with self._lock(run.run_id):
                        if run.state is RunState.RUNNING:
                            await self._exhaust_run(run, f"run deadline of {run.job.budget.deadline_s:g} s passed",
                                                    guard="deadline")
                            await self._settle(run)
                    await self.store.sync()
                    await self._publish_snapshot(run)

    # -- the one place state changes ----------------------------------------------------------

    async def _apply(self, run: RunRecord, task: TaskRecord, event: TaskEvent, *, actor: str, reason: str = "",
                     detail: dict[str, Any] | None = None, guard: str = "") -> None:
        before = task.state
        task.state = transition(task.state, event, task_id=task.id)
        if task.terminal:
            index = self._index[run.run_id]
            index.unfinished -= 1
            index.ended.append(task.id)
            if self.tracing.enabled:
                end(self._spans.pop((run.run_id, task.id), None), attributes={"orchestrator.outcome": str(task.state)},
                    error="" if task.state is TaskState.ACCEPTED else reason or str(task.state))
        if reason:
            task.reason = reason
        detail = dict(detail or {})
        if reason:
            detail["reason"] = reason
        if guard:
            detail["guard"] = guard  # which guard stopped the task: loop, repeated_feedback, attempts, tokens, deadline
        await self._emit(run, task, kind="transition", event=str(event), actor=actor, detail=detail,
                         from_state=str(before), to_state=str(task.state))
        log.info("task_transitioned", run_id=run.run_id, task_id=task.id, attempt=task.attempt, task_event=str(event),
                 from_state=str(before), to_state=str(task.state), reason=reason or None)

    async def _emit(self, run: RunRecord, task: TaskRecord | None, *, kind: str, event: str, actor: str = "",
                    detail: dict[str, Any] | None = None, from_state: str = "", to_state: str = "") -> None:
        # Built from values this manager already holds: skip validation on the hottest path.
        record = Event.model_construct(seq=run.next_seq, run_id=run.run_id, task_id=task.id if task else "",
                                       attempt=task.attempt if task else 0, time=time.time(), kind=kind, event=event,
                                       from_state=from_state, to_state=to_state, actor=actor or self.name,
                                       detail=detail or {})
        run.next_seq += 1
        await self.store.record(run, task, record)
        self._logs[run.run_id].append(record)
        for observer in self.observers:
            try:
                observer(run, task, record)
            except Exception:  # a broken metrics hook must not stop runs
                log.exception("observer_failed", observer=repr(observer), run_id=run.run_id)
        if self.settings.publish_events:
            self._unpublished.append(record)
            self._wake_acker.set()

    def _lock(self, run_id: str) -> anyio.Lock:
        """The lock that serializes changes to one run."""
        lock = self._locks.get(run_id)
        if lock is None:
            lock = self._locks[run_id] = anyio.Lock()
        return lock

    def _live(self, run_id: str) -> RunRecord:
        run = self._runs.get(run_id)
        if run is None:
            raise ConfigError(f"run {run_id!r} is not running on this manager")
        return run


_MISSING: Any = object()
_EVENTS_PER_MESSAGE = 500  # keeps a batch of history well under the frame size limit


def _by_run(events: list[Event]) -> dict[str, list[list[Event]]]:
    """Events grouped per run, in order, in chunks that fit a bus message."""
    runs: dict[str, list[Event]] = {}
    for event in events:
        runs.setdefault(event.run_id, []).append(event)
    return {run_id: [run_events[i:i + _EVENTS_PER_MESSAGE] for i in range(0, len(run_events), _EVENTS_PER_MESSAGE)]
            for run_id, run_events in runs.items()}


@dataclass(slots=True)
class _EventLog:
    """A run's events since this manager took it over, with a wake-up for followers."""

    first_seq: int
    events: list[Event] = field(default_factory=list)
    changed: anyio.Event = field(default_factory=anyio.Event)
    finished: bool = False

    def append(self, event: Event) -> None:
        self.events.append(event)
        if event.kind == "run" and event.event == "run_finished":
            self.finished = True
        self.changed.set()  # cheap when already set: a new event is made only when someone waits

    def next_change(self) -> anyio.Event:
        """An event set by the next append. Call it only after seeing that nothing new is there."""
        if self.changed.is_set():
            self.changed = anyio.Event()
        return self.changed

    def since(self, after: int) -> list[Event]:
        return self.events[max(0, after + 1 - self.first_seq):]


@dataclass(slots=True)
class _RunIndex:
    """Derived from a run's records, kept so each reply does work proportional to its task, not the run."""

    dependents: dict[str, list[str]]
    unfinished: int
    ended: list[str]  # tasks that became terminal and whose dependents are not settled yet

    @classmethod
    def of(cls, run: RunRecord) -> _RunIndex:
        dependents: dict[str, list[str]] = {}
        for task in run.tasks.values():
            for dep in task.depends_on:
                dependents.setdefault(dep, []).append(task.id)
        ended = [t.id for t in run.tasks.values() if t.terminal]
        return cls(dependents, len(run.tasks) - len(ended), ended)


def _clip(value: Any, limit: int = 500) -> Any:
    text = repr(value)
    return value if len(text) <= limit else text[:limit] + "..."


def _plan(run: RunRecord, task: TaskRecord) -> str:
    deps = f" It builds on {', '.join(task.depends_on)}." if task.depends_on else ""
    return f"Goal: {run.goal}. This task ({task.id}): {task.instruction}.{deps}"


def _context(task: TaskRecord) -> str:
    text = repr(task.output)
    if len(text) > _CONTEXT_CHARS:
        text = text[:_CONTEXT_CHARS] + "..."
    return f"Attempt {task.attempt} returned: {text}"
