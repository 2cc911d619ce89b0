"""Prometheus metrics of the manager, fed from its events (``Manager(observers=[metrics.observe])``).

Needs ``prometheus-client`` (``pip install 'orchestrator[metrics]'``). Bus gauges (queue depth, dead
letters) are refreshed by ``watch_bus``, which the manager process runs next to the manager.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import anyio
import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from orchestrator.records import Event, RunRecord, TaskRecord
from protocol.bus import Bus
from protocol.errors import OrchestratorError
from protocol.history import Dispatched, RunFinished, Transitioned
from protocol.keys import JOBS_STREAM, OVERRIDES_STREAM, results_stream, tasks_stream, workers_group
from protocol.metrics import DURATION_BUCKETS, InferenceMetrics, MetricsServer, WorkerMetrics, children, serve_metrics
from protocol.states import TaskEvent

__all__ = ("InferenceMetrics", "ManagerMetrics", "MetricsServer", "WorkerMetrics", "serve_metrics")

log = structlog.get_logger(__name__)

ATTEMPT_BUCKETS = (1, 2, 3, 4, 5, 6, 8, 10, 15, 20)


class ManagerMetrics:
    """``orchestrator_*`` metrics of runs and tasks, derived from the manager's events alone.

    ``observe`` is the manager observer: O(1) per event (a resumed run costs one pass over its tasks once).
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.tasks = Gauge("orchestrator_tasks", "Tasks of the runs this manager ran, by current state",
                           ("capability", "state"), registry=registry)
        self.transitions = Counter("orchestrator_task_transitions", "Task state transitions",
                                   ("event", "from_state", "to_state"), registry=registry)
        self.dispatches = Counter("orchestrator_task_dispatches", "Attempts sent to workers", ("capability",),
                                  registry=registry)
        self.redos = Counter("orchestrator_task_redos", "Results rejected by verification and sent back for a redo",
                             ("capability",), registry=registry)
        self.verifications = Counter("orchestrator_verifications", "Verification outcomes (pass, reject) by "
                                     "verifier stage (spec, worker, judge, human)",
                                     ("verifier", "outcome"), registry=registry)
        self.attempts = Histogram("orchestrator_task_attempts", "Attempts an accepted task took", ("capability",),
                                  buckets=ATTEMPT_BUCKETS, registry=registry)
        self.latency = Histogram("orchestrator_task_latency_seconds", "Time from a task's first dispatch to its "
                                 "acceptance", ("capability",), buckets=DURATION_BUCKETS, registry=registry)
        self.runs = Gauge("orchestrator_runs", "Runs this manager ran, by current state", ("state",),
                          registry=registry)
        self.queue_depth = Gauge("orchestrator_queue_depth", "Task messages not yet acknowledged by workers "
                                 "(waiting plus in flight)", ("capability",), registry=registry)
        self.dead_letters = Gauge("orchestrator_dead_letters", "Messages the bus gave up on, per stream",
                                  ("stream",), registry=registry)
        self._seen: set[str] = set()  # runs whose tasks are counted in ``tasks``
        # labelled children, cached: ``labels()`` validates and locks on every call, too slow for every event
        self._task = children(self.tasks)
        self._transition_of = children(self.transitions)
        self._dispatch = children(self.dispatches)
        self._redo = children(self.redos)
        self._verification = children(self.verifications)
        self._attempts = children(self.attempts)
        self._latency = children(self.latency)
        self._run = children(self.runs)

    def observe(self, run: RunRecord, task: TaskRecord | None, event: Event) -> None:
        """The manager observer: update the metrics an event changes."""
        if run.run_id not in self._seen:
            self._adopt(run, task, event)
        body = event.body
        verdict = event.verdict
        if verdict is not None:
            self._verification(str(verdict.stage), "pass" if verdict.passed else "reject").inc()
        if task is not None and isinstance(body, Transitioned):
            self._transition(task, event, body)
        elif task is not None and isinstance(body, Dispatched):
            self._dispatch(task.capability).inc()
        elif isinstance(body, RunFinished):
            self._run("running").dec()
            self._run(str(body.state)).inc()
            self._seen.discard(run.run_id)

    def _transition(self, task: TaskRecord, event: Event, body: Transitioned) -> None:
        before, after = str(body.from_state), str(body.to_state)
        self._transition_of(str(body.event), before, after).inc()
        self._task(task.capability, before).dec()
        self._task(task.capability, after).inc()
        if body.event is TaskEvent.PASS:
            self._attempts(task.capability).observe(task.attempt)
            if task.attempts:
                self._latency(task.capability).observe(max(0.0, event.time - task.attempts[0].started))
        elif body.event is TaskEvent.REJECT:
            self._redo(task.capability).inc()

    def _adopt(self, run: RunRecord, task: TaskRecord | None, event: Event) -> None:
        """Count a run's tasks the first time it is seen: at its start, or when this manager resumed it."""
        self._seen.add(run.run_id)
        self._run("running").inc()
        moved = event.body.from_state if isinstance(event.body, Transitioned) else None
        for t in run.tasks.values():
            # The task of this event has already moved: count it where it was.
            self._task(t.capability, str(moved if t is task and moved is not None else t.state)).inc()

    async def watch_bus(self, bus: Bus, capabilities: Callable[[], Iterable[str]], *, interval_s: float = 5.0) -> None:
        """Refresh queue depth and dead-letter gauges every ``interval_s`` until cancelled."""
        while True:
            started = time.monotonic()
            try:
                await self.refresh_bus(bus, capabilities())
            except OrchestratorError as exc:
                log.warning("metrics_refresh_failed", error=str(exc))
            await anyio.sleep(max(0.0, interval_s - (time.monotonic() - started)))

    async def refresh_bus(self, bus: Bus, capabilities: Iterable[str]) -> None:
        """Read queue depth and dead letters of each capability's streams from the bus once."""
        for capability in sorted(capabilities):
            stream = tasks_stream(capability)
            self.queue_depth.labels(capability).set(await bus.depth(stream, workers_group(capability)))
            for name in (stream, results_stream(capability)):
                self.dead_letters.labels(name).set(await bus.dead_letter_count(name))
        for name in (JOBS_STREAM, OVERRIDES_STREAM):  # forged or malformed submissions and overrides land here
            self.dead_letters.labels(name).set(await bus.dead_letter_count(name))
