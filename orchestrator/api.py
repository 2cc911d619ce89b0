"""The ``Orchestrator`` facade: one object that hosts a manager and, when embedded, its workers."""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any, Self

import anyio
import structlog

from orchestrator.job import Budget, Job, load_job, parse_job
from orchestrator.judge import LLMJudge
from orchestrator.manager import Judge, Manager, ManagerObserver, ManagerSettings
from orchestrator.planner import Planner
from orchestrator.records import Event, RunRecord, RunState
from orchestrator.store import MemoryStore, Store
from orchestrator.trust import load_trust
from protocol.bus import Bus, MemoryBus
from protocol.errors import ConfigError, JobError
from protocol.inference import InferenceClient
from protocol.inference_settings import InferenceSettings
from protocol.keyring import Keyring
from protocol.logging import configure_logging
from protocol.redis_bus import RedisBus
from protocol.tracing import Tracing
from workers import registry
from workers.base import Worker
from workers.runtime import RuntimeObserver, RuntimeSettings, WorkerRuntime

__all__ = ("Orchestrator", "Run", "RunResult")

log = structlog.get_logger("orchestrator.api")

JobLike = Job | Mapping[str, Any] | str | Path
WorkerLike = Worker | type[Worker] | str


class RunResult:
    """How a run ended: its state, reason and every task's state, attempts and output."""

    def __init__(self, record: RunRecord) -> None:
        self.record = record

    @property
    def run_id(self) -> str:
        """The run's id."""
        return self.record.run_id

    @property
    def state(self) -> RunState:
        """``accepted``, ``failed`` or ``cancelled``."""
        return self.record.state

    @property
    def accepted(self) -> bool:
        """Whether every task was accepted."""
        return self.record.state is RunState.ACCEPTED

    @property
    def reason(self) -> str:
        """Why the run failed or was cancelled (empty when accepted)."""
        return self.record.reason

    @property
    def outputs(self) -> dict[str, Any]:
        """Each task's last output, by task id."""
        return {t.id: t.output for t in self.record.tasks.values()}

    def to_dict(self) -> dict[str, Any]:
        """The ``--json`` object: ``run_id``, ``state``, ``tasks`` (``id``, ``capability``, ``state``, ...)."""
        return self.record.summary()

    def __repr__(self) -> str:
        return f"RunResult(run_id={self.run_id!r}, state={str(self.state)!r})"


class Run:
    """A submitted run: iterate its events as they happen, wait for it, or cancel it."""

    def __init__(self, manager: Manager, run_id: str) -> None:
        self._manager = manager
        self.run_id = run_id

    def events(self) -> AsyncIterator[Event]:
        """Every event of the run from the start, then live ones, until the run ends."""
        return self._manager.events(self.run_id)

    async def wait(self) -> RunResult:
        """Block until the run ends."""
        return RunResult(await self._manager.wait(self.run_id))

    async def cancel(self, task_id: str | None = None, *, by: str = "api", reason: str = "") -> None:
        """Cancel the run, or one of its tasks."""
        await self._manager.cancel(self.run_id, task_id, by=by, reason=reason)

    async def approve(self, task_id: str, *, by: str = "api") -> None:
        """Accept a task that waits for a person (``spec: {approval: human}``)."""
        await self._manager.override(self.run_id, task_id, "approve", by=by)

    async def reject(self, task_id: str, feedback: str, *, by: str = "api") -> None:
        """Send a task's result back with feedback; the worker sees it in ``task.feedback``."""
        await self._manager.override(self.run_id, task_id, "reject", feedback=feedback, by=by)

    async def redo(self, task_id: str, feedback: str = "", *, by: str = "api") -> None:
        """Force another attempt at a task, stopping the one in flight, with feedback for the worker."""
        await self._manager.override(self.run_id, task_id, "redo", feedback=feedback, by=by)

    async def accept(self, task_id: str, *, by: str = "api") -> None:
        """Accept a task's result as it stands, whatever the checks would say."""
        await self._manager.override(self.run_id, task_id, "accept", by=by)


class Orchestrator:
    """Run jobs from Python.

    ```python
    async with Orchestrator() as orch:
        result = await orch.run("examples/quickstart.yaml")
    ```

    With no arguments everything is in process: a ``MemoryBus``, a ``MemoryStore``, and a
    worker for every installed plugin (entry point group ``orchestrator.workers``). Pass
    ``workers`` to choose them (instances, classes, entry point names or ``module:Class``),
    or ``host_workers=False`` when workers run as separate processes on a shared bus.

    ``metrics_port`` serves Prometheus metrics of the manager, hosted workers and LLM client at
    ``metrics_url`` (0 picks a free port; needs ``orchestrator[metrics]``). ``tracing`` turns on
    OpenTelemetry spans with a given provider; by default they follow ``Tracing.detect()``.

    On a ``RedisBus`` every message is signed: the Orchestrator signs as ``manager`` and as each
    hosted worker's ``worker:<capability>``, with keys from ``keys`` (a directory or a
    ``Keyring``; default ``ORCH_KEYS`` or ``.orchestrator/keys``), and refuses to start without
    them unless ``insecure=True``. A bus built with a signing codec is used as it is.
    """

    def __init__(self, *, bus: Bus | None = None, store: Store | None = None,
                 workers: Iterable[WorkerLike] | None = None, host_workers: bool = True, concurrency: int = 8,
                 llm: InferenceSettings | InferenceClient | None = None, judge: Judge | None = None,
                 manager_settings: ManagerSettings | None = None, metrics_port: int | None = None,
                 metrics_host: str = "127.0.0.1", tracing: Tracing | None = None,
                 keys: str | os.PathLike[str] | Keyring | None = None, insecure: bool = False) -> None:
        self.bus = bus or MemoryBus()
        self._keys, self._insecure = keys, insecure
        self.store = store or MemoryStore()
        self._worker_specs = list(workers) if workers is not None else None
        self._host_workers = host_workers
        self._concurrency = concurrency
        self._llm = llm
        self.inference: InferenceClient | None = llm if isinstance(llm, InferenceClient) else None
        self.workers: dict[str, Worker] = {}
        self._unavailable: dict[str, str] = {}
        self.tracing = tracing or Tracing.detect()
        # Prometheus metrics (opt-in): one registry for the manager, hosted workers and the LLM client.
        self.metrics_registry: Any = None
        self.metrics_url = ""
        self._metrics_at = (metrics_host, metrics_port)
        self._manager_metrics: Any = None
        observers: list[ManagerObserver] = []
        if metrics_port is not None:
            try:
                from prometheus_client import CollectorRegistry

                from orchestrator.metrics import ManagerMetrics
            except ImportError as exc:
                raise ConfigError("metrics_port needs prometheus-client: pip install 'orchestrator[metrics]'") from exc
            self.metrics_registry = CollectorRegistry()
            self._manager_metrics = ManagerMetrics(self.metrics_registry)
            observers.append(self._manager_metrics.observe)
        self.manager = Manager(self.bus, self.store, manager_settings, judge=judge, observers=observers,
                               tracing=self.tracing)
        self._stack: AsyncExitStack | None = None

    def _sign_on_redis(self) -> None:
        """On Redis, sign as the manager and the hosted workers, unless the bus already signs or ``insecure``."""
        if not isinstance(self.bus, RedisBus) or self.bus.settings.codec.verifies:
            return
        signers = ["manager", *(f"worker:{c}" for c in sorted(self.workers))]
        trust = load_trust(self._keys, signers, insecure=self._insecure, what="an Orchestrator on Redis")
        self.bus.settings = replace(self.bus.settings, codec=trust.codec())

    @property
    def capabilities(self) -> set[str] | None:
        """Capabilities served in process, or None when workers run elsewhere (not checked at submit)."""
        return set(self.workers) if self._host_workers else None

    async def __aenter__(self) -> Self:
        if not structlog.is_configured():
            # An application that did not set up logging gets warnings on stderr, not info lines on stdout.
            configure_logging("WARNING")
        stack = AsyncExitStack()
        try:
            if self.metrics_registry is not None:
                from protocol.metrics import InferenceMetrics, serve_metrics

                host, port = self._metrics_at
                server = serve_metrics(port or 0, self.metrics_registry, host=host)
                stack.callback(server.close)
                self.metrics_url = server.url
            if isinstance(self._llm, InferenceSettings):
                observer = InferenceMetrics(self.metrics_registry) if self.metrics_registry is not None else None
                self.inference = await stack.enter_async_context(InferenceClient(self._llm, observer=observer,
                                                                                 tracing=self.tracing))
            elif self.inference is not None and self.metrics_registry is not None and self.inference.observer is None:
                self.inference.observer = InferenceMetrics(self.metrics_registry)
            if self.inference is not None:
                await self.inference.check()
                if self.manager.judge is None:
                    self.manager.judge = LLMJudge(self.inference)
            if self._host_workers:
                self.workers, self._unavailable = _instantiate(self._worker_specs, has_llm=self.inference is not None)
            self._sign_on_redis()
            await stack.enter_async_context(self.bus)
            await stack.enter_async_context(self.store)
            tg = await stack.enter_async_context(anyio.create_task_group())
            stack.callback(tg.cancel_scope.cancel)
            await tg.start(self.manager.serve)
            if self._manager_metrics is not None:
                tg.start_soon(functools.partial(self._manager_metrics.watch_bus, self.bus,
                                                lambda: self.manager.capabilities, interval_s=1.0))
            if self.workers:
                worker_observers: list[RuntimeObserver] = []
                if self.metrics_registry is not None:
                    from protocol.metrics import WorkerMetrics

                    worker_observers.append(WorkerMetrics(self.metrics_registry))
                runtime = WorkerRuntime(self.bus, self.workers, RuntimeSettings(concurrency=self._concurrency),
                                        inference=self.inference, observers=worker_observers, tracing=self.tracing)
                for worker in self.workers.values():
                    worker.context = runtime.context_for(worker.capability)
                await stack.enter_async_context(runtime.running())
        except BaseException:
            await stack.aclose()
            raise
        self._stack = stack
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._stack is not None:
            stack, self._stack = self._stack, None
            await stack.aclose()

    def load(self, job: JobLike) -> Job:
        """Validate a job (a Job, a mapping, or a path to a YAML file) against the capabilities served."""
        source = str(job) if isinstance(job, str | Path) else None
        parsed = load_job(job) if isinstance(job, str | Path) else parse_job(job)
        for t in parsed.tasks:
            if t.capability in self._unavailable:
                raise JobError(self._unavailable[t.capability], source=source, task_id=t.id, field="capability")
        return parse_job(parsed, source=source, capabilities=self.capabilities)

    async def plan(self, goal: str, *, budget: Budget | None = None) -> Job:
        """Ask the language model to turn ``goal`` into a validated job (needs ``llm=``)."""
        if self.inference is None:
            raise ConfigError("planning a goal needs a language model: pass llm=InferenceSettings(...) "
                              "or set ORCH_LLM_URL")
        capabilities = [c for c, w in self.workers.items() if w.needs_inference] or ["llm"]
        return await Planner(self.inference, capabilities=capabilities, budget=budget).plan(goal)

    async def submit(self, job: JobLike) -> Run:
        """Start a run and return at once; iterate ``run.events()`` or ``await run.wait()``."""
        if self._stack is None:
            raise ConfigError("use 'async with Orchestrator(...) as orch' before submitting jobs")
        run_id = await self.manager.submit(self.load(job))
        return Run(self.manager, run_id)

    def attach(self, run_id: str) -> Run:
        """A handle on a run this orchestrator's manager knows (submitted here, or resumed from its store)."""
        return Run(self.manager, run_id)

    async def run(self, job: JobLike) -> RunResult:
        """Run a job to the end."""
        return await (await self.submit(job)).wait()


def _instantiate(specs: list[WorkerLike] | None, *, has_llm: bool) -> tuple[dict[str, Worker], dict[str, str]]:
    """The workers to host, and the capabilities left out with the reason (they need a language model)."""
    if specs is None:
        specs = list(registry.available())
    workers: dict[str, Worker] = {}
    unavailable: dict[str, str] = {}
    for spec in specs:
        if isinstance(spec, Worker):
            worker = spec
        else:
            cls = registry.load(spec) if isinstance(spec, str) else spec
            if cls.needs_inference and not has_llm:
                unavailable[cls.capability] = (f"capability {cls.capability!r} needs a language model: pass "
                                               "--llm-url (or set ORCH_LLM_URL), or llm= when embedding")
                continue
            worker = cls()
        if worker.capability in workers:
            raise ConfigError(f"two workers serve capability {worker.capability!r}")
        workers[worker.capability] = worker
    return workers, unavailable
