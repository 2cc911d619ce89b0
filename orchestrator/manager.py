"""The manager: a thin async shell around the run engine.

It consumes replies, submissions and overrides from the bus, applies each to its run's engine
under the run's lock, and carries the effects out: record (store, followers, observers), send
assigns and verify requests, run spec checks and the judge, stop work, end the run. Replies are
acknowledged only after the store has made their effects durable (``Acknowledger``); timers,
presence and dead letters come from ``Watchdogs``. Every rule lives in ``orchestrator.engine``.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog
from anyio.abc import TaskGroup, TaskStatus
from structlog.contextvars import bind_contextvars, reset_contextvars

from orchestrator import engine as rules
from orchestrator._checks import CheckRegistry, default_checks
from orchestrator.acknowledger import Acknowledger, Mirror
from orchestrator.engine import (
    Checked,
    Effect,
    Ended,
    Ignored,
    Input,
    Instant,
    Presence,
    Redrive,
    Refused,
    Reply,
    RequestCheck,
    RunEngine,
    SendAssign,
    Start,
    StopWork,
    Tick,
)
from orchestrator.gathered import Gathered
from orchestrator.job import Job, parse_job, parse_job_in_parts
from orchestrator.records import Event, RunRecord, RunState, TaskRecord, task_records
from orchestrator.snapshots import Snapshots
from orchestrator.staged_jobs import MAX_JOB_BYTES, discard, unstage
from orchestrator.store import Store
from orchestrator.verifier import run_check
from orchestrator.watchdogs import Watchdogs, now
from protocol.bus import Bus, Delivery
from protocol.envelope import Envelope
from protocol.errors import ConfigError, OrchestratorError
from protocol.history import Dispatched, HistoryEvent, RunFinished, Transitioned
from protocol.keys import (
    CONTROL_TOPIC,
    JOBS_STREAM,
    MANAGER_GROUP,
    OVERRIDES_STREAM,
    results_stream,
    run_snapshot_key,
    tasks_stream,
)
from protocol.limits import OUTPUT_LIMITS, LimitExceeded, check_shape
from protocol.logging import enabled as logging_enabled
from protocol.messages import (
    Assign,
    Cancel,
    Done,
    Failed,
    Heartbeat,
    Override,
    OverrideAction,
    Progress,
    Submit,
    Verdict,
    VerifyRequest,
    VerifyResponse,
)
from protocol.states import TERMINAL, VerifyStage
from protocol.tracing import Tracing, end

__all__ = ("Judge", "Manager", "ManagerObserver", "ManagerSettings")

log = structlog.get_logger("orchestrator.manager")

# An LLM (or other) judge for specs with a ``description``: (task, output) -> verdict.
Judge = Callable[[TaskRecord, Any], Awaitable[Verdict]]

# Called synchronously with every event the manager records, after it is recorded: (run, task or None, event).
# It runs on the manager's hottest path, so it must be O(1), must not block, and must not change the records.
ManagerObserver = Callable[[RunRecord, TaskRecord | None, Event], None]

_FINISHED_LOGS_KEPT = 100
DEFAULT_DISPATCH_WINDOW = 10_000  # ManagerSettings.dispatch_window, and the manager process's --dispatch-window
_DISPATCH_SLICE = 1000  # assigns built and published at once
_STARTS_PER_STEP = 64  # runs of a batch started between two turns of the event loop
_Assigns = dict[str, list[tuple[RunRecord, TaskRecord, int]]]  # per capability: the tasks to send, at their attempt
_RECORD_SLICE = 5000  # a new run's task records made between two checkpoints (~35 ms)
_REPLIES = (Done, Failed, VerifyResponse, Heartbeat, Progress)
_UNCOMMITTED_REPLIES_MAX = 2_000  # replies handled ahead of the ledger's commits before the manager waits for one
_FOLLOWED_MAX = 1_000  # runs whose history is mirrored at once; anyone who can write to the bus can ask
_PRESENCE_LOOKUP_S = 1.0  # how long a submission may wait to learn whether a new capability has workers


@dataclass(frozen=True, slots=True)
class ManagerSettings:
    """Manager behaviour."""

    name: str = "manager"
    tick_s: float = 0.2  # how often time is fed to the runs (deadlines, retry delays)
    incarnation_check_s: float = 1.0  # how often presence, dead letters and bus data loss are looked at
    # How long finished runs stay visible to ``status``, and a run's history on the bus after its last event
    snapshot_ttl_s: float = 7 * 24 * 3600.0
    snapshot_interval_s: float = 0.5  # how often a running run's summary is refreshed for ``status``
    # ... and no faster than this many bytes of summary a second per run (a 100,000-task run's is ~25 MB)
    snapshot_bytes_per_s: float = 2_000_000.0
    # Whose history the manager mirrors to the bus for ``events``/``watch``/the console elsewhere: the runs someone
    # follows (they say so on the bus), every run, or none. The ledger has every run's history either way.
    mirror: Mirror = "followed"
    publish_events: bool = True  # False: mirror nothing, as ``mirror="off"`` (the older switch)
    follows_poll_s: float = 0.25  # how often the manager looks for new followers (their wait for a history)
    events_kept: int = 4096  # a run's latest events held in memory; a follower further behind reads the store
    # Records of recently finished runs kept for wait(), counted in tasks (a run bigger than this is not kept)
    finished_tasks_kept: int = 10_000
    # The most tasks of one run in flight at once (dispatched, not ended); more ready tasks are held and go out
    # as these end. A 100,000-task run dispatched all at once held an attempt, an event and an assign for every
    # task from its start on. None: no limit.
    dispatch_window: int | None = DEFAULT_DISPATCH_WINDOW
    # The most of a staged submission (a job too big for one message, orchestrator/staged_jobs.py) it reads.
    max_job_bytes: int = MAX_JOB_BYTES


class Manager:
    """Runs jobs: feeds the engine of each run and carries out what it decides."""

    def __init__(self, bus: Bus, store: Store, settings: ManagerSettings | None = None, *,
                 judge: Judge | None = None, observers: Sequence[ManagerObserver] = (),
                 tracing: Tracing | None = None, checks: CheckRegistry | None = None) -> None:
        self.bus = bus
        self.store = store
        self.settings = settings or ManagerSettings()
        self.name = self.settings.name
        self.judge = judge
        # The check names jobs may use; a job naming any other is refused (job files never import code).
        self.checks = checks or default_checks()
        self.observers = tuple(observers)
        self.tracing = tracing or Tracing.detect()
        self._spans: dict[tuple[str, str], Any] = {}  # the open span of each task's current attempt (tracing on)
        self._engines: dict[str, RunEngine] = {}
        self._locks: dict[str, anyio.Lock] = {}
        self._starting: dict[str, anyio.Event] = {}  # runs submitted, waiting for their creation to be durable
        # Live events of runs in memory, for events() and wait(). Ordered so the oldest is found at once: a dict
        # scans over the slots of every entry deleted since it last resized (4 µs a look after 5,000 runs ended).
        self._logs: OrderedDict[str, _EventLog] = OrderedDict()
        self._finished = _FinishedRuns(self.settings.finished_tasks_kept)
        self._consuming: set[str] = set()
        self._tg: TaskGroup | None = None
        self._stale_snapshots: set[str] = set()
        # Runs to start, and runs whose first or final summary is due: each loop handles the runs gathered while it
        # was busy in one go. With many short runs, a task, a sync and a write for each was most of the manager's time.
        self._to_start: Gathered[tuple[RunEngine, Instant]] = Gathered()
        self._under_way: Gathered[RunRecord] = Gathered()
        self._ended: Gathered[RunRecord] = Gathered()
        self._snapshots = Snapshots(bytes_per_s=self.settings.snapshot_bytes_per_s)
        mirror = self.settings.mirror if self.settings.publish_events else "off"
        self._acker = Acknowledger(bus, store, sender=self.name, mirror=mirror,
                                   history_ttl_s=self.settings.snapshot_ttl_s, on_committed=self._stale_snapshots.update)
        self._watchdogs: Watchdogs | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until cancelled; ready to accept ``submit`` once started."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            self._watchdogs = dogs = Watchdogs(self.bus, self._feed, capabilities=lambda: self._consuming,
                                               incarnation=await self.bus.incarnation())
            await self._resume()
            tg.start_soon(dogs.tick, self.settings.tick_s)
            tg.start_soon(dogs.watch_bus, self.settings.incarnation_check_s)
            tg.start_soon(self._acker.run)
            tg.start_soon(self._consume_jobs)
            tg.start_soon(self._consume_overrides)
            tg.start_soon(self._refresh_snapshots)
            if self._acker.mirror_mode == "followed":
                tg.start_soon(self._watch_followers)
            tg.start_soon(self._start_runs)
            tg.start_soon(self._publish_under_way)
            tg.start_soon(self._publish_ended)
            log.info("manager_started", manager=self.name, resumed=len(self._engines))
            task_status.started()
            await anyio.sleep_forever()

    # -- public operations -----------------------------------------------------------------

    async def submit(self, job: Job, *, run_id: str | None = None) -> str:
        """Start a run of ``job``; returns its run id at once. Submitting a known run id again is a no-op."""
        if run_id is not None and await self._known(run_id):
            return run_id
        at = now()
        self._serving()  # refuses a submission before serve() runs
        run = RunRecord.new(job, run_id, now=at.wall, tasks=await _task_records(job))
        # Stored before anything else sees the run: a store may read its records across awaits.
        await self.store.create_run(run)
        run.release_task_defs()  # the store took the job; a 100,000-task job's list was ~0.5 KB a task
        capabilities = _capabilities_of(run)
        await self._learn_presence(capabilities - self._consuming)
        engine = self._track(run, capabilities)
        self._starting[run.run_id] = anyio.Event()
        self._to_start.add((engine, at))
        return run.run_id

    async def _start_runs(self) -> None:
        """Dispatch new runs once their creation is durable, each batch the runs submitted meanwhile.

        Nothing goes to a worker for a run the ledger could still lose, and the runs of a batch share the
        group commit (one fsync for many runs instead of one each) and the write of their assigns.
        """
        while True:
            for engine in await self._start_batch(await self._to_start.take()):
                run = engine.run
                # The first summary of a big run renders every task (~1 s at 100,000): rendered here a part at a
                # time first, so the event loop is not held that long at once, and only what changed is done again.
                for _ in self._snapshots.warm(run):
                    await anyio.lowlevel.checkpoint()
                self._under_way.add(run)  # so status and the console know the run as soon as it is under way

    async def _start_batch(self, batch: list[tuple[RunEngine, Instant]]) -> list[RunEngine]:
        """Start the runs of ``batch``; returns those that got under way.

        A run that fails to start stays in the ledger as running; the next manager resumes it.
        """
        locks: list[anyio.Lock] = []
        assigns: _Assigns = {}
        started: list[RunEngine] = []
        try:
            await self.store.sync()
            for index, (engine, at) in enumerate(batch):
                if index % _STARTS_PER_STEP == _STARTS_PER_STEP - 1:
                    await anyio.lowlevel.checkpoint()  # thousands submitted at once: let replies and commits in
                await _acquire(lock := self._lock(engine.run.run_id))
                locks.append(lock)
                try:
                    await self._carry_out(engine, engine.apply(Start(at)), assigns)
                except Exception:
                    log.exception("run_start_failed", run_id=engine.run.run_id)
                else:
                    started.append(engine)
            await self._send(assigns)
        except Exception:
            log.exception("runs_start_failed", run_ids=[engine.run.run_id for engine, _ in batch])
            return []
        finally:
            for lock in locks:
                lock.release()
            for engine, _ in batch:
                self._starting.pop(engine.run.run_id).set()
        return started

    async def wait(self, run_id: str) -> RunRecord:
        """Block until the run ends; returns its final record."""
        engine = self._engines.get(run_id)
        if engine is None and (finished := self._finished.get(run_id)) is not None:
            # Ended here a moment ago: submitting many runs and then waiting for each read every one back
            # from the ledger (and its history, once its events had left memory).
            return finished
        if run_id in self._logs:
            while not self._logs[run_id].finished:
                await self._logs[run_id].next_change().wait()
        else:
            async for _ in self.events(run_id):
                pass
        await self.store.sync()
        if engine is not None and engine.finished:
            # Ended here: the record in memory is the durable one, and nothing changes a finished run, so
            # it is handed out as it is (a deep copy of a 5,000-task run cost more than the run's last second).
            return engine.run
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
            if not await self.store.has_run(run_id):
                raise ConfigError(f"unknown run {run_id!r}")
            for event in await self.store.events(run_id, after):
                yield event
            return
        while True:
            if log_.first_seq > after + 1:
                # Before what memory holds (a resumed run, or older than the log keeps): from the store.
                before = after
                for event in await self.store.events(run_id, after):
                    if event.seq >= log_.first_seq:
                        break
                    after = event.seq
                    yield event
                if after == before:  # the store has nothing before the log: go on from the log
                    after = log_.first_seq - 1
                continue
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
        await self._operate(run_id, rules.Cancel(task_id or "", by, reason or f"cancelled by {by}", now()))

    async def override(self, run_id: str, task_id: str, action: OverrideAction, *, feedback: str = "",
                       by: str = "api") -> None:
        """A person's decision about a task: approve, reject (with feedback), redo, accept or cancel.

        Raises ConfigError naming the run, task and state when the action does not apply.
        """
        await self._operate(run_id, rules.Override(task_id, action, feedback, by, now()))

    async def _operate(self, run_id: str, change: Input) -> None:
        engine = self._engines.get(run_id)
        if engine is None:
            raise ConfigError(f"run {run_id!r} is not running on this manager")
        if (starting := self._starting.get(run_id)) is not None:
            await starting.wait()
        async with self._lock(run_id):
            effects = engine.apply(change)
            await self._execute(engine, effects)
        await self.store.sync()
        await self._publish_snapshot(engine.run)
        refused = next((e for e in effects if isinstance(e, Refused)), None)
        if refused is not None:
            raise ConfigError(refused.reason)

    @property
    def capabilities(self) -> frozenset[str]:
        """The capabilities this manager has sent tasks to (whose streams it reads)."""
        return frozenset(self._consuming)

    def snapshot(self, run_id: str) -> RunRecord:
        """The live record of a run this manager is running (a copy)."""
        engine = self._engines.get(run_id)
        if engine is None:
            raise ConfigError(f"run {run_id!r} is not running on this manager")
        return engine.run.snapshot()

    # -- engines -----------------------------------------------------------------------------

    async def _learn_presence(self, capabilities: set[str]) -> None:
        """Look up whether live workers serve ``capabilities`` (new to this manager) before a run is judged by it.

        The presence checks only ask about capabilities in use, so a new one counted as unserved, and the
        first tasks of a run recorded that they waited for a worker until the next check, with one there.
        """
        if not capabilities or self._watchdogs is None:
            return
        # Bounded: the bus rides out an outage by retrying, and a submission must not wait for it. Without an
        # answer the run starts on what the manager knew, and the next check tells it.
        with anyio.move_on_after(_PRESENCE_LOOKUP_S) as scope:
            try:
                await self._watchdogs.check_presence(also=capabilities)
            except OrchestratorError as exc:
                log.warning("presence_unknown", capabilities=sorted(capabilities), error=str(exc))
        if scope.cancelled_caught:
            log.warning("presence_unknown", capabilities=sorted(capabilities),
                        error=f"no answer from the bus within {_PRESENCE_LOOKUP_S:g} s")

    def _track(self, run: RunRecord, capabilities: set[str]) -> RunEngine:
        served = self._watchdogs.served if self._watchdogs is not None else None
        engine = RunEngine(run, actor=self.name, judge=self.judge is not None, served=served,
                           window=self.settings.dispatch_window)
        self._engines[run.run_id] = engine
        self._logs[run.run_id] = _EventLog(first_seq=run.next_seq, keep=self.settings.events_kept)
        while len(self._logs) > _FINISHED_LOGS_KEPT and (oldest := next(iter(self._logs))) not in self._engines:
            del self._logs[oldest]
        for capability in capabilities:
            self._consume_results_of(capability)
        return engine

    async def _feed(self, run_id: str | None, change: Input) -> None:
        """Apply an input from a watchdog to one run, or to every run."""
        if run_id is None:
            targets = list(self._engines.values())
        else:
            targets = [self._engines[run_id]] if run_id in self._engines else []
        tick_at = change.at.mono if isinstance(change, Tick) else None
        served = change.served if isinstance(change, Presence) else None
        for engine in targets:
            if engine.run.run_id in self._starting:  # not started yet: nothing for a watchdog to see
                continue
            # Ticks and presence visit every run (five and one times a second), and most have nothing due.
            if tick_at is not None and tick_at < engine.tick_due():
                continue
            if served is not None and not engine.presence_changes(served):
                continue
            # A tick visits every run, most have nothing to do: a yield per run made a tick cost O(runs) turns.
            await _acquire(lock := self._lock(engine.run.run_id))
            try:
                if engine.finished:
                    continue
                effects = engine.apply(change)
                if effects:
                    await self._execute(engine, effects)
            finally:
                lock.release()
            if effects:
                self._stale_snapshots.add(engine.run.run_id)

    async def _execute(self, engine: RunEngine, effects: list[Effect]) -> None:
        """Carry out what the engine decided, in order. Called with the run's lock held."""
        assigns: _Assigns = {}
        await self._carry_out(engine, effects, assigns)
        await self._send(assigns)

    async def _carry_out(self, engine: RunEngine, effects: list[Effect], assigns: _Assigns) -> None:
        """``_execute`` but for sending the assigns: those are added to ``assigns``, for ``_send``."""
        run = engine.run
        events: list[HistoryEvent] = []
        actions: list[Effect] = []
        for effect in effects:
            if isinstance(effect, HistoryEvent):
                events.append(effect)
            else:
                actions.append(effect)
        # Once recorded, the store and the followers have the events: a big run's start dispatches every task,
        # and holding its events while the assigns went out a slice at a time was ~1 KB a task of the peak.
        del effects
        if events:  # all at once: a sync between them would make records durable ahead of their history
            await self.store.record_all(run, [(run.tasks.get(e.task_id) if e.task_id else None, e) for e in events])
            for event in events:
                self._recorded(run, event)
            del events
        for effect in actions:
            match effect:
                case SendAssign():
                    task = run.tasks[effect.task_id]
                    assigns.setdefault(task.capability, []).append((run, task, task.attempt))
                case RequestCheck():
                    await self._check(engine, effect)
                case StopWork():
                    await self.bus.broadcast(CONTROL_TOPIC, Envelope(run_id=run.run_id, task_id=effect.task_id,
                                                                     sender=self.name,
                                                                     body=Cancel(reason=effect.reason, by=effect.by)))
                case Ended():
                    self._ended.add(run)
                    if logging_enabled(logging.INFO):  # once a run: with one-task runs, as often as a transition
                        log.info("run_finished", run_id=run.run_id, state=str(effect.state), reason=effect.reason)
                case Ignored(suspicious=True):
                    log.warning("forged_input_ignored", run_id=run.run_id, reason=effect.reason)
                case Ignored() if logging_enabled(logging.INFO):
                    log.info("input_ignored", run_id=run.run_id, reason=effect.reason)
                case Refused():
                    log.warning("override_refused", run_id=run.run_id, reason=effect.reason)

    async def _send(self, assigns: _Assigns) -> None:
        for capability, tasks in assigns.items():
            # A dispatch wave goes out in a few calls per capability, built a slice at a time: the envelopes
            # and frames of a 100,000-task wave built at once were a third of the manager's peak memory.
            # A task whose attempt moved on meanwhile (a check above re-dispatched it) was sent by then.
            for i in range(0, len(tasks), _DISPATCH_SLICE):
                await self.bus.publish_many(tasks_stream(capability), [
                    self._assign(run, task) for run, task, attempt in tasks[i:i + _DISPATCH_SLICE]
                    if task.attempt == attempt])

    def _recorded(self, run: RunRecord, event: Event) -> None:
        """What follows recording an event: followers, observers, tracing, the status cache, the log."""
        task = run.tasks.get(event.task_id) if event.task_id else None
        if task is not None:
            self._snapshots.changed(run.run_id, task.id)
        self._logs[run.run_id].append(event)
        if self.tracing.enabled and task is not None:
            self._trace(run, task, event)
        for observer in self.observers:
            try:
                observer(run, task, event)
            except Exception:  # a broken metrics hook must not stop runs
                log.exception("observer_failed", observer=repr(observer), run_id=run.run_id)
        self._acker.mirror(event)
        if isinstance(event.body, Transitioned) and logging_enabled(logging.INFO):
            log.info("task_transitioned", run_id=run.run_id, task_id=event.task_id, attempt=event.attempt,
                     task_event=str(event.body.event), from_state=str(event.body.from_state),
                     to_state=str(event.body.to_state), reason=event.body.reason or None)

    async def _check(self, engine: RunEngine, request: RequestCheck) -> None:
        """Run a verifier the engine asked for: spec checks here and now, the judge in the background,
        the worker's own check by a verify request."""
        run = engine.run
        task = run.tasks[request.task_id]
        if request.stage is VerifyStage.SPEC and task.spec.check is not None:  # the engine did expect and schema
            verdict = await run_check(task.spec.check, task.output, task, self.checks)
            await self._execute(engine, engine.apply(Checked(task.id, request.attempt, request.stage, verdict, now())))
        elif request.stage is VerifyStage.WORKER:
            await self.bus.publish(tasks_stream(task.capability), Envelope(
                run_id=run.run_id, task_id=task.id, attempt=task.attempt, sender=self.name,
                trace=self._trace_context(run, task),
                body=VerifyRequest(capability=task.capability, instruction=task.instruction, input=task.input,
                                   output=task.output, spec_description=task.spec.description, config=task.config,
                                   timeout_s=task.timeout_s)))
        elif request.stage is VerifyStage.JUDGE:
            assert self._tg is not None
            self._tg.start_soon(self._run_judge, engine, task, request.attempt)

    async def _run_judge(self, engine: RunEngine, task: TaskRecord, attempt: int) -> None:
        if self.judge is None:
            verdict = Verdict(passed=False, verifier="judge", feedback="no judge is configured on this manager")
        else:
            # A span under the attempt's, current while the judge works, so its model calls are the attempt's too.
            with self.tracing.span(f"judge {task.capability}", parent=self._trace_context(engine.run, task) or None,
                                   attributes={"orchestrator.run_id": engine.run.run_id, "orchestrator.task_id": task.id,
                                               "orchestrator.attempt": attempt}) as span:
                try:
                    verdict = await self.judge(task, task.output)
                except Exception as exc:
                    verdict = Verdict(passed=False, verifier="judge",
                                      feedback=f"judge failed: {type(exc).__name__}: {exc}")
                if span is not None:
                    span.set_attribute("orchestrator.verdict", "pass" if verdict.passed else "fail")
        await self._feed(engine.run.run_id, Checked(task.id, attempt, VerifyStage.JUDGE, verdict, now()))
        await self.store.sync()
        await self._publish_snapshot(engine.run)

    # -- bus streams -------------------------------------------------------------------------

    def _serving(self) -> TaskGroup:
        if self._tg is None:
            raise RuntimeError("Manager.serve() must be running before submit()")
        return self._tg

    def _consume_results_of(self, capability: str) -> None:
        if capability in self._consuming:
            return
        tg = self._serving()
        self._consuming.add(capability)
        tg.start_soon(self._consume_results, capability)

    async def _consume_results(self, capability: str) -> None:
        async for delivery in self.bus.consume(results_stream(capability), group=MANAGER_GROUP, consumer=self.name):
            try:
                await self._on_reply(capability, delivery)
            except Exception as exc:
                # A reply this manager cannot handle would fail again on every redelivery (and restart):
                # out of circulation at once, with the reason, and on to the next.
                log.exception("reply_processing_failed", run_id=delivery.envelope.run_id,
                              task_id=delivery.envelope.task_id, type=delivery.envelope.type)
                await self._bury(delivery, f"handling the {delivery.envelope.type!r} reply failed: "
                                           f"{type(exc).__name__}: {exc}")
                continue
            self._acker.defer(delivery)
            if self._acker.backlog >= _UNCOMMITTED_REPLIES_MAX:
                # Handled faster than the ledger commits (its fsync): the records, history and receipts of
                # every reply wait in memory for the next commit, so take no more until one has ended. A
                # 100,000-task run's last wave piled up ~5,000 replies this way, ~0.2 KB a task of its peak.
                await self._acker.next_commit()

    async def _on_reply(self, capability: str, delivery: Delivery) -> None:
        env = delivery.envelope
        engine = self._engines.get(env.run_id)
        if engine is None:
            log.info("reply_for_unknown_run_dropped", run_id=env.run_id, type=env.type)
            return
        if not isinstance(env.body, _REPLIES):
            log.warning("unexpected_message_on_result_stream", run_id=env.run_id, type=env.type)
            return
        if self._watchdogs is not None:  # before the reply: what it starts must not wait for a worker
            await self._watchdogs.worker_seen(capability)
        signer = env.signer if self.bus.settings.codec.verifies else None
        reply = Reply(env.task_id, env.attempt, env.sender, capability, _within_limits(env.body), now(), signer)
        # Bound with tokens that put back what was there: cheaper than bound_contextvars, which copies the context.
        bound = bind_contextvars(run_id=env.run_id, task_id=env.task_id, attempt=env.attempt)
        await _acquire(lock := self._lock(env.run_id))
        try:
            await self._execute(engine, engine.apply(reply))
        finally:
            lock.release()
            reset_contextvars(**bound)

    async def _consume_jobs(self) -> None:
        """Start runs submitted by other processes (``orchestrator submit``)."""
        async for delivery in self.bus.consume(JOBS_STREAM, group=MANAGER_GROUP, consumer=self.name):
            await self._take_submission(delivery)

    async def _take_submission(self, delivery: Delivery) -> None:
        """Start the run a submission asks for, or record why not; then acknowledge or bury the submission.

        A method of its own so that the job dies with it: as a local of the consuming loop, the last submitted
        job and its task list (~0.4 KB a task) stayed alive for as long as no other submission came.
        """
        env = delivery.envelope
        if not isinstance(env.body, Submit):
            await self._bury(delivery, f"a {env.type!r} message does not belong on the jobs stream")
            return
        staged = env.body.staged
        try:
            if staged is not None and env.run_id and await self._known(env.run_id):
                await discard(self.bus, env.run_id)  # delivered again after its run was recorded
                await self.bus.ack(delivery)
                return
            try:
                run_id = await self.submit(await self._job_of(env.run_id, env.body), run_id=env.run_id or None)
            except Exception as exc:
                # The submitter validated the job; a job that still fails here (with this manager's
                # checks, or sent around the CLI) is recorded as a failed run.
                log.warning("submitted_job_rejected", run_id=env.run_id, error=str(exc))
                await self._record_rejected(env.run_id, env.body, str(exc))
                await self.store.sync()
            else:
                await self.store.sync()
                if (engine := self._engines.get(run_id)) is not None:
                    # Before the ack deletes the submission, so status finds one or the other (find_run).
                    await self._publish_snapshot(engine.run)
            if staged is not None:
                await discard(self.bus, env.run_id)
        except Exception as exc:  # even recording the rejection failed: the submission must not stop us
            log.exception("submission_processing_failed", run_id=env.run_id)
            await self._bury(delivery, f"handling the submission failed: {type(exc).__name__}: {exc}")
            return
        await self.bus.ack(delivery)

    async def _job_of(self, run_id: str, submit: Submit) -> Job:
        """The submitted job, validated; a staged one read and checked first (its plain data freed once parsed)."""
        source = submit.source or None
        if submit.staged is None:
            return parse_job(submit.job, source=source, checks=self.checks)
        header, tasks = await unstage(self.bus, run_id, submit.staged, max_bytes=self.settings.max_job_bytes)
        job = parse_job_in_parts(header, tasks, source=source, checks=self.checks)
        log.info("staged_job_read", run_id=run_id, bytes=submit.staged.size, tasks=submit.staged.tasks)
        return job

    async def _known(self, run_id: str) -> bool:
        return run_id in self._engines or await self.store.has_run(run_id)

    async def _consume_overrides(self) -> None:
        """Apply overrides sent by people from any machine (``orchestrator approve`` and friends)."""
        async for delivery in self.bus.consume(OVERRIDES_STREAM, group=MANAGER_GROUP, consumer=self.name):
            env = delivery.envelope
            if not isinstance(env.body, Override):
                await self._bury(delivery, f"a {env.type!r} message does not belong on the overrides stream")
                continue
            try:
                await self.override(env.run_id, env.task_id, env.body.action, feedback=env.body.feedback,
                                    by=self._who(env))
            except Exception as exc:  # a person's bad request must not stop the manager
                log.warning("override_refused", run_id=env.run_id, task_id=env.task_id, action=env.body.action,
                            by=env.body.by, reason=str(exc), error_type=type(exc).__name__)
            await self.store.sync()
            await self.bus.ack(delivery)

    def _who(self, env: Envelope) -> str:
        """Who sent an override: the key that signed it, or (on an unsigned bus) the name it gives itself."""
        if self.bus.settings.codec.verifies:
            return env.signer
        return env.body.by if isinstance(env.body, Override) and env.body.by else env.sender

    async def _record_rejected(self, run_id: str, submit: Submit, reason: str) -> None:
        at = now()
        goal = submit.job.get("goal")  # hostile data: only a string, and not a long one, names the run
        goal = goal[:200] if isinstance(goal, str) and goal.strip() else "(invalid job)"
        run = RunRecord.new(Job(goal=goal), run_id or None, now=at.wall)
        run.state, run.reason, run.finished = RunState.FAILED, f"invalid job: {reason}", at.wall
        await self.store.create_run(run)
        await self._publish_snapshot(run)

    async def _bury(self, delivery: Delivery, reason: str) -> None:
        """Dead-letter an input this manager cannot use, with the reason, so it is neither lost nor retried."""
        try:
            await self.bus.bury(delivery, reason[:2000])
        except Exception:  # the lease runs out and the bus dead-letters it after its redeliveries
            log.exception("dead_letter_failed", stream=delivery.stream, entry_id=delivery.entry_id)

    # -- recovery ----------------------------------------------------------------------------

    async def _resume(self) -> None:
        """Pick up the runs a previous manager left unfinished, and re-drive their in-flight tasks."""
        for run in await self.store.running_runs():
            run.release_task_defs()
            engine = self._track(run, _capabilities_of(run))
            async with self._lock(run.run_id):
                await self._execute(engine, engine.apply(Redrive(now())))
            log.info("run_resumed", run_id=run.run_id)

    # -- snapshots for ``status`` ----------------------------------------------------------------

    async def _publish_under_way(self) -> None:
        """The first summary of each run that got under way, all gathered since the last in one write."""
        while True:
            await self._publish_summaries([run for run in await self._under_way.take() if run.run_id in self._engines])

    async def _publish_ended(self) -> None:
        """Finished runs' summaries, once their ends are durable, so ``status`` never reports an end it could lose.

        Then the manager lets the runs go: the store has them, and their events stay in memory a while for followers.
        """
        while True:
            runs = await self._ended.take()
            await self.store.sync()
            for run in runs:
                self._finished.put(run)
            await self._publish_summaries(runs)
            for run in runs:
                self._let_go(run.run_id)

    def _let_go(self, run_id: str) -> None:
        for table in (self._engines, self._locks):
            table.pop(run_id, None)
        self._snapshots.forget(run_id)
        for key in [k for k in self._spans if k[0] == run_id]:
            end(self._spans.pop(key))

    async def _watch_followers(self) -> None:
        """Tell the acknowledger which runs are followed, as followers come and go."""
        while True:
            self._acker.set_followers(await self.bus.followers(limit=_FOLLOWED_MAX))
            await anyio.sleep(self.settings.follows_poll_s)

    async def _refresh_snapshots(self) -> None:
        """Refresh the summaries of runs that changed; a summary of a big run is too costly for every reply."""
        while True:
            await anyio.sleep(self.settings.snapshot_interval_s)
            at = time.monotonic()
            stale = {run_id for run_id in self._stale_snapshots if self._snapshots.due(run_id, at)}
            self._stale_snapshots.difference_update(stale)  # in place: the acknowledger holds its update method
            summaries = {run_snapshot_key(run_id): self._snapshots.render(self._engines[run_id].run, now=at)
                         for run_id in stale if run_id in self._engines}
            # Small ones in one round trip for all of them: with thousands of short runs in flight, one each was
            # a noticeable share of the manager's time. Big ones (25 MB at 100,000 tasks) a piece at a time.
            await self.bus.put_values_in_parts(summaries, ttl_s=self.settings.snapshot_ttl_s)
            del summaries

    async def _publish_snapshot(self, run: RunRecord) -> None:
        await self._publish_summaries([run])

    async def _publish_summaries(self, runs: list[RunRecord]) -> None:
        """The runs' summaries for ``status``, in one write (a big one a piece at a time)."""
        at = time.monotonic()
        await self.bus.put_values_in_parts({run_snapshot_key(run.run_id): self._summary_parts(run, at) for run in runs},
                                           ttl_s=self.settings.snapshot_ttl_s)

    def _summary_parts(self, run: RunRecord, at: float) -> Sequence[bytes]:
        if run.run_id in self._engines:
            return self._snapshots.render(run, now=at)
        return [json.dumps(run.summary(), default=str).encode()]  # a run this manager does not hold (rejected)

    # -- messages and tracing ----------------------------------------------------------------

    def _assign(self, run: RunRecord, task: TaskRecord) -> Envelope:
        body = Assign(capability=task.capability, instruction=task.instruction, input=task.input, config=task.config,
                      spec_description=task.spec.description, timeout_s=task.timeout_s, redo=task.redo,
                      dependencies={d: run.tasks[d].output for d in task.depends_on})
        return Envelope(run_id=run.run_id, task_id=task.id, attempt=task.attempt, sender=self.name,
                        trace=self._trace_context(run, task), body=body)

    def _trace(self, run: RunRecord, task: TaskRecord, event: Event) -> None:
        """Each attempt is a span: started when dispatched, ended when the next starts or the task ends."""
        key = (run.run_id, task.id)
        body = event.body
        if isinstance(body, Dispatched):
            end(self._spans.pop(key, None), attributes={"orchestrator.outcome": "redone"})
            self._spans[key] = self.tracing.start(
                f"attempt {task.capability}", kind="producer",
                attributes={"orchestrator.run_id": run.run_id, "orchestrator.task_id": task.id,
                            "orchestrator.attempt": task.attempt, "orchestrator.capability": task.capability})
        elif isinstance(body, Transitioned) and body.to_state in TERMINAL:
            end(self._spans.pop(key, None), attributes={"orchestrator.outcome": str(body.to_state)},
                error="" if body.to_state == "accepted" else body.reason or str(body.to_state))

    def _trace_context(self, run: RunRecord, task: TaskRecord) -> dict[str, str]:
        """The trace context for envelopes about the task's current attempt (empty with tracing off)."""
        if not self.tracing.enabled:
            return {}
        return self.tracing.inject(self._spans.get((run.run_id, task.id)))

    def _lock(self, run_id: str) -> anyio.Lock:
        """The lock that serializes changes to one run."""
        lock = self._locks.get(run_id)
        if lock is None:
            lock = self._locks[run_id] = anyio.Lock()
        return lock


async def _acquire(lock: anyio.Lock) -> None:
    """Take ``lock``; a free one without a checkpoint (a turn of the event loop per reply and per run)."""
    try:
        lock.acquire_nowait()
    except anyio.WouldBlock:
        await lock.acquire()


def _within_limits(body: Any) -> Any:
    """A ``done`` whose output is too deep, too big or not JSON data becomes a failed attempt naming the limit.

    Stored, such an output would break the ledger's serializer on every write and every restart.
    """
    if isinstance(body, Done):
        try:
            check_shape(body.output, OUTPUT_LIMITS, what="the output")
        except LimitExceeded as exc:
            return Failed(error=f"output rejected: {exc}", error_type="LimitExceeded", retryable=True)
    return body


class _FinishedRuns:
    """The records of the latest runs that ended here, oldest dropped first, at most ``tasks`` tasks in all."""

    def __init__(self, tasks: int) -> None:
        self.limit = tasks
        self._runs: OrderedDict[str, RunRecord] = OrderedDict()  # oldest first, found at once (see Manager._logs)
        self._tasks = 0

    def put(self, run: RunRecord) -> None:
        if len(run.tasks) > self.limit or run.run_id in self._runs:
            return
        self._runs[run.run_id] = run
        self._tasks += len(run.tasks)
        while self._tasks > self.limit:
            _, oldest = self._runs.popitem(last=False)
            self._tasks -= len(oldest.tasks)

    def get(self, run_id: str) -> RunRecord | None:
        return self._runs.get(run_id)


@dataclass(slots=True)
class _EventLog:
    """A run's latest events (between ``keep`` and twice that), with a wake-up for followers.

    ``first_seq`` is the sequence number of the oldest event held; everything before it is in
    the store (an event is recorded there before it is appended here).
    """

    first_seq: int
    events: list[Event] = field(default_factory=list)
    changed: anyio.Event | None = None  # made when someone first waits: most runs are never waited on
    finished: bool = False
    keep: int = 4096

    def append(self, event: Event) -> None:
        self.events.append(event)
        if len(self.events) >= 2 * self.keep:  # drop the older half at once: amortized O(1) per event
            del self.events[:-self.keep]
            self.first_seq = self.events[0].seq
        if isinstance(event.body, RunFinished):
            self.finished = True
        if self.changed is not None:
            self.changed.set()  # cheap when already set: a new event is made only when someone waits

    def next_change(self) -> anyio.Event:
        """An event set by the next append. Call it only after seeing that nothing new is there."""
        if self.changed is None or self.changed.is_set():
            self.changed = anyio.Event()
        return self.changed

    def since(self, after: int) -> list[Event]:
        return self.events[max(0, after + 1 - self.first_seq):]


def _capabilities_of(run: RunRecord) -> set[str]:
    return {t.capability for t in run.tasks.values()}


async def _task_records(job: Job) -> dict[str, TaskRecord]:
    """The records of a new run's tasks, a slice at a time: a 100,000-task job's took ~0.7 s of the event loop
    at once (its lease renewals, heartbeats and replies of other runs waited meanwhile)."""
    tasks: dict[str, TaskRecord] = {}
    for i in range(0, len(job.tasks), _RECORD_SLICE):
        tasks.update(task_records(job.tasks[i:i + _RECORD_SLICE], job.budget.max_attempts))
        if i + _RECORD_SLICE < len(job.tasks):
            await anyio.lowlevel.checkpoint()
    return tasks
