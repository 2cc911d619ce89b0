"""The long-running processes behind ``orchestrator manager`` and ``orchestrator worker``, and the
client side of ``submit`` and ``status``: everything that talks to a shared Redis bus.

Signals are handled here, at the process edge: SIGTERM and SIGINT stop a worker gracefully
(finish or hand back in-flight work) and a manager cleanly (release its lease).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import msgpack
import redis.asyncio as aioredis
import structlog

from orchestrator._checks import CheckRegistry, default_checks
from orchestrator.acknowledger import Mirror
from orchestrator.following import HISTORY_WAIT_S, Follower, history_length
from orchestrator.gctune import tune_gc
from orchestrator.job import Job
from orchestrator.judge import LLMJudge
from orchestrator.leader import LeaderLease, LeadershipLost
from orchestrator.ledger import SQLiteStore
from orchestrator.manager import DEFAULT_DISPATCH_WINDOW, Manager, ManagerSettings
from orchestrator.records import Event
from orchestrator.snapshots import TASKS_START
from orchestrator.staged_jobs import submission
from orchestrator.trust import Trust
from protocol.bus import Bus, BusSettings
from protocol.envelope import Envelope, new_id
from protocol.errors import BusUnavailable, ConfigError, NoActiveManager, SubmissionRefused, UnknownRun
from protocol.history import RunFinished
from protocol.inference import InferenceClient
from protocol.inference_settings import InferenceSettings
from protocol.keys import JOBS_STREAM, OVERRIDES_STREAM, run_snapshot_key
from protocol.messages import Override, OverrideAction, Submit
from protocol.redis_bus import RedisBus
from protocol.settings import RedisSettings, redact_url
from protocol.states import OVERRIDE_RULES, TaskState, VerifyStage, override_allowed
from protocol.tracing import Tracing
from workers import registry
from workers.runtime import RuntimeObserver, RuntimeSettings, WorkerRuntime

__all__ = (
    "NoActiveManager",
    "Observability",
    "UnknownRun",
    "active_manager",
    "fetch_head",
    "fetch_status",
    "find_run",
    "follow_events",
    "no_manager_reason",
    "read_events",
    "run_manager",
    "run_worker",
    "send_override",
    "submit_job",
    "summary_head",
    "wait_for_manager",
    "wait_for_run",
)

log = structlog.get_logger("orchestrator.processes")

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def redis_url(cli_value: str | None) -> str:
    """The Redis URL: the flag, else ``ORCH_REDIS_URL``, else localhost."""
    return cli_value or os.environ.get("ORCH_REDIS_URL") or DEFAULT_REDIS_URL


def default_name(role: str) -> str:
    """A process name unique on this machine and readable in logs."""
    return f"{role}-{socket.gethostname()}-{os.getpid()}"


def open_bus(url: str, *, namespace: str, lease_s: float, trust: Trust, retry_budget_s: float | None = 30.0,
             max_queue: int | None = None) -> RedisBus:
    """A Redis bus with the process's lease, retry budget and signing; ``max_queue`` bounds each task stream.

    ``trust`` says how messages are signed and checked (``load_trust``; ``INSECURE`` for unsigned).
    ``retry_budget_s`` is how long Redis may stay unreachable before a call raises ``BusUnavailable``;
    None waits for as long as the outage lasts (the manager and worker processes).
    """
    settings = RedisSettings.from_url(url, namespace=namespace, retry_budget_s=retry_budget_s,
                                      max_task_stream_len=max_queue)
    return RedisBus(settings, BusSettings(lease_s=lease_s, codec=trust.codec()))


def _check_exit_after(exit_after_s: float | None) -> None:
    if exit_after_s is not None and not exit_after_s >= 0:
        raise ConfigError(f"--exit-after-s must be 0 or more seconds, got {exit_after_s:g}")


async def _until_signalled(scope: anyio.CancelScope, on_signal: Callable[[], None] | None = None) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("signal_received", signal=signal.Signals(signum).name)
            if on_signal is not None:
                on_signal()
            else:
                scope.cancel()
            return


@dataclass(frozen=True, slots=True)
class Observability:
    """What a process exposes: a Prometheus endpoint (``metrics_port``; 0 picks a free port) and traces.

    ``tracing=True`` configures OpenTelemetry from the environment (``protocol.tracing.configure``);
    without it, traces are on only when the application set a tracer provider or ``ORCH_TRACING=1``.
    """

    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"
    tracing: bool = False
    bus_refresh_s: float = 5.0


NO_OBSERVABILITY = Observability()


def _metrics_registry(stack: ExitStack, obs: Observability, role: str) -> Any:
    """A fresh registry served on ``obs.metrics_port`` until ``stack`` closes, or None when no port is asked."""
    if obs.metrics_port is None:
        return None
    try:
        from prometheus_client import CollectorRegistry

        from protocol.metrics import serve_metrics
    except ImportError as exc:
        raise ConfigError("--metrics-port needs prometheus-client: pip install 'orchestrator[metrics]'") from exc
    registry = CollectorRegistry()
    try:
        server = serve_metrics(obs.metrics_port, registry, host=obs.metrics_host)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {obs.metrics_host}:{obs.metrics_port}: {exc}") from exc
    stack.callback(server.close)
    log.info("metrics_serving", role=role, url=server.url)
    return registry


def _tracing(obs: Observability) -> Tracing:
    if obs.tracing:
        from protocol.tracing import configure

        configure()
    return Tracing.detect()


async def _inference(stack: AsyncExitStack, settings: InferenceSettings | None, *, registry: Any = None,
                     tracing: Tracing | None = None) -> InferenceClient | None:
    """The process's one shared inference client, checked against the server, or None."""
    if settings is None:
        return None
    observer = None
    if registry is not None:
        from protocol.metrics import InferenceMetrics

        observer = InferenceMetrics(registry)
    client = await stack.enter_async_context(InferenceClient(settings, observer=observer, tracing=tracing))
    await client.check()
    return client


async def run_manager(*, url: str, ledger: Path, name: str, namespace: str, lease_s: float,
                      manager_lease_s: float, llm: InferenceSettings | None = None,
                      ready: Callable[[], Awaitable[None]] | None = None,
                      observability: Observability = NO_OBSERVABILITY, max_queue: int | None = None,
                      dispatch_window: int | None = DEFAULT_DISPATCH_WINDOW, mirror: Mirror = "followed",
                      exit_after_s: float | None = None, trust: Trust,
                      allow_checks: Sequence[str] = ()) -> None:
    """Wait for leadership, then manage runs until a signal; ``trust`` must let it sign as ``manager``.

    ``allow_checks`` are ``module:function`` checks jobs may name besides the installed ones.

    ``max_queue`` is back-pressure: dispatching waits while a capability has that many tasks
    waiting or in flight, so a slow capability does not pile up unbounded work in Redis.
    ``dispatch_window`` is the most tasks of one run in flight at once (``ManagerSettings.dispatch_window``).

    With ``llm`` the manager judges specs that have a ``description`` with the LLM judge.
    A manager that loses its lease (another took over, or Redis was down or restarted empty for
    longer than the lease, so the lease key expired or vanished) stops managing at once and goes
    back to standing by: it leads again, from the ledger and under a new epoch, when the lease is
    free. It does not exit, so a Redis outage longer than the lease needs no process restart.

    Redis outages of any length are waited out: while leading, every bus call retries (and the
    lease, which cannot be renewed, makes the manager step down once it may have expired); while
    standing by, taking the lease retries. With ``exit_after_s`` the manager raises
    ``BusUnavailable`` (the CLI exits 1) once Redis has been unreachable that long.
    """
    _check_exit_after(exit_after_s)
    lease = LeaderLease(url, name=name, namespace=namespace, lease_s=manager_lease_s, exit_after_s=exit_after_s)
    with ExitStack() as sync_stack:
        registry = _metrics_registry(sync_stack, observability, "manager")
        tracing = _tracing(observability)
        metrics = None
        if registry is not None:
            from orchestrator.metrics import ManagerMetrics

            metrics = ManagerMetrics(registry)
        async with anyio.create_task_group() as tg, AsyncExitStack() as stack:
            stack.push_async_callback(lease.aclose)
            tg.start_soon(_until_signalled, tg.cancel_scope)
            client = await _inference(stack, llm, registry=registry, tracing=tracing)
            judge = LLMJudge(client) if client else None
            lead = functools.partial(_lead, lease, url=url, ledger=ledger, namespace=namespace, lease_s=lease_s,
                                     judge=judge, ready=ready, metrics=metrics, tracing=tracing,
                                     bus_refresh_s=observability.bus_refresh_s, max_queue=max_queue,
                                     dispatch_window=dispatch_window, mirror=mirror, exit_after_s=exit_after_s,
                                     trust=trust,
                                     checks=default_checks(allow_checks))
            await _lead_forever(lease, lead, name)


async def _lead_forever(lease: LeaderLease, lead: Callable[..., Awaitable[None]], name: str) -> None:
    while True:
        epoch = await lease.acquire()
        try:
            await lead(name=f"{name}@{epoch}")
        except* LeadershipLost as lost:
            log.warning("leadership_lost_standing_by", manager=name, epoch=epoch, error=str(lost.exceptions[0]))
        finally:
            await lease.release()


async def _lead(lease: LeaderLease, *, url: str, ledger: Path, name: str, namespace: str, lease_s: float,
                judge: LLMJudge | None, ready: Callable[[], Awaitable[None]] | None, metrics: Any = None,
                tracing: Tracing | None = None, bus_refresh_s: float = 5.0, max_queue: int | None = None,
                dispatch_window: int | None = DEFAULT_DISPATCH_WINDOW, mirror: Mirror = "followed",
                exit_after_s: float | None = None, trust: Trust,
                checks: CheckRegistry | None = None) -> None:
    """Manage runs while ``lease`` holds; raises LeadershipLost (in a group) when it is lost."""
    async with (open_bus(url, namespace=namespace, lease_s=lease_s, max_queue=max_queue,
                         retry_budget_s=exit_after_s, trust=trust) as bus,
                SQLiteStore(ledger) as store,
                anyio.create_task_group() as tg):
        settings = ManagerSettings(name=name, dispatch_window=dispatch_window, mirror=mirror)
        manager = Manager(bus, store, settings, judge=judge, observers=[metrics.observe] if metrics is not None else [],
                          tracing=tracing, checks=checks)
        await tg.start(lease.hold)
        await tg.start(manager.serve)
        if metrics is not None:
            tg.start_soon(functools.partial(metrics.watch_bus, bus, lambda: manager.capabilities,
                                            interval_s=bus_refresh_s))
        log.info("manager_ready", manager=manager.name, ledger=str(ledger))
        if ready is not None:
            await ready()
        await anyio.sleep_forever()


async def run_worker(*, url: str, capability: str, plugin: str, concurrency: int, name: str, namespace: str,
                     lease_s: float, config: dict[str, Any], drain_s: float, exit_after_s: float | None = None,
                     llm: InferenceSettings | None = None, observability: Observability = NO_OBSERVABILITY,
                     trust: Trust, gc_thresholds: tuple[int, int, int] | None = None) -> int:
    """Serve one capability until SIGTERM (drain); Redis outages are waited out, however long they last.

    With ``exit_after_s`` it raises ``BusUnavailable`` (the CLI exits 1) once Redis has been
    unreachable that long. With ``gc_thresholds`` (the worker process's own, ``WORKER_THRESHOLDS``) the
    collector is tuned once the plugin and the clients are loaded (``orchestrator.gctune``).
    """
    _check_exit_after(exit_after_s)
    worker_class = registry.load(plugin)
    if worker_class.capability != capability:
        raise ConfigError(f"plugin {plugin!r} serves capability {worker_class.capability!r}, not {capability!r}")
    if worker_class.needs_inference and llm is None:
        raise ConfigError(f"capability {capability!r} needs a language model: pass --llm-url or set ORCH_LLM_URL")
    worker = worker_class(config)
    with ExitStack() as sync_stack:
        metrics_registry = _metrics_registry(sync_stack, observability, "worker")
        tracing = _tracing(observability)
        return await _serve_worker(worker, url=url, capability=capability, concurrency=concurrency, name=name,
                                   namespace=namespace, lease_s=lease_s, drain_s=drain_s,
                                   exit_after_s=exit_after_s, llm=llm if worker_class.needs_inference else None,
                                   metrics_registry=metrics_registry, tracing=tracing, trust=trust,
                                   gc_thresholds=gc_thresholds)


async def _serve_worker(worker: Any, *, url: str, capability: str, concurrency: int, name: str, namespace: str,
                        lease_s: float, drain_s: float, exit_after_s: float | None, llm: InferenceSettings | None,
                        metrics_registry: Any, tracing: Tracing, trust: Trust,
                        gc_thresholds: tuple[int, int, int] | None) -> int:
    observers: list[RuntimeObserver] = []
    if metrics_registry is not None:
        from protocol.metrics import WorkerMetrics

        observers.append(WorkerMetrics(metrics_registry))
    async with AsyncExitStack() as stack:
        client = await _inference(stack, llm, registry=metrics_registry, tracing=tracing)
        bus = await stack.enter_async_context(open_bus(url, namespace=namespace, lease_s=lease_s,
                                                       retry_budget_s=exit_after_s, trust=trust))
        runtime = WorkerRuntime(bus, {capability: worker},
                                RuntimeSettings(concurrency=concurrency, name=name, drain_s=drain_s), inference=client,
                                observers=observers, tracing=tracing)
        worker.context = runtime.context_for(capability)
        if gc_thresholds is not None:
            tune_gc(gc_thresholds)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_until_signalled, tg.cancel_scope, runtime.stop)
            await runtime.serve()
            tg.cancel_scope.cancel()
    return runtime.completed


async def submit_job(bus: Bus, job: Job, *, source: str = "", run_id: str | None = None) -> str:
    """Hand a validated job to the active manager; returns the run id at once."""
    run_id = run_id or new_id()
    # What was given, as a job file says it: a spec keeps which of its fields were set (its meaning), and
    # its defaults left out cost a 100,000-task job ~50 MB less in the manager (a fields-set a spec). Each
    # task is made plain data as the submission takes it, not the whole job at once (~50 MB at 100,000 tasks).
    header = job.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude={"tasks"})
    tasks = (task.model_dump(mode="json", by_alias=True, exclude_unset=True) for task in job.tasks)
    submit = await submission(bus, run_id, header, tasks, source=source)
    await bus.publish(JOBS_STREAM, Envelope(run_id=run_id, sender=default_name("client"), body=submit))
    return run_id


async def fetch_status(bus: Bus, run_id: str) -> dict[str, Any] | None:
    """The manager's latest summary of a run (``run_id``, ``state``, ``tasks``), or None if unknown."""
    raw = await bus.get_value(run_snapshot_key(run_id))
    return None if raw is None else dict(json.loads(raw))


async def ended_status(bus: Bus, run_id: str, *, within_s: float = 10.0, poll_s: float = 0.05
                       ) -> dict[str, Any] | None:
    """The summary of a run whose history has ended, once it says so too (or the latest after ``within_s``).

    The manager records a run's end in its history a moment before it publishes the final
    summary, so a follower that saw the end may still read ``running`` for a short while.
    """
    status = await fetch_status(bus, run_id)
    with anyio.move_on_after(within_s):
        while status is not None and status["state"] in ("queued", "running"):
            await anyio.sleep(poll_s)
            status = await fetch_status(bus, run_id)
    return status


async def find_run(bus: Bus, run_id: str) -> dict[str, Any] | None:
    """The run's summary, like ``fetch_status``; for a submission no manager has taken yet, one in state ``queued``.

    None when neither exists. The manager publishes a run's summary before it acknowledges (and so
    deletes) the submission, so looking for the summary, then the submission, then the summary
    again cannot miss a run that is being taken at that moment.
    """
    if (status := await fetch_status(bus, run_id)) is not None:
        return status
    submit = await _queued_submission(bus, run_id)
    if submit is not None:
        tasks = submit.job.get("tasks") or []  # a staged job's are not read here: only their count
        staged = f" (a staged job of {submit.staged.tasks} tasks)" if submit.staged is not None else ""
        return {"run_id": run_id, "goal": submit.job.get("goal", ""), "state": "queued",
                "reason": f"waiting for a manager to take the submission{staged}", "tokens": 0, "held": 0,
                "tasks": [{"id": t.get("id", ""), "capability": t.get("capability", ""), "state": "not_done",
                           "attempts": 0, "output": None, "reason": "", "worker": "", "tokens": 0}
                          for t in tasks if isinstance(t, dict)]}
    return await fetch_status(bus, run_id)


async def _queued_submission(bus: Bus, run_id: str) -> Submit | None:
    """The submission of ``run_id`` still in the jobs stream (taken ones are deleted), or None."""
    after = "0"
    while batch := await bus.read(JOBS_STREAM, after=after):
        after = batch[-1][0]
        for _, env in batch:
            if env.run_id == run_id and isinstance(env.body, Submit):
                return env.body
    return None


def manager_lease_key(namespace: str) -> str:
    """The key ``orchestrator.leader.LeaderLease`` holds (``NAME@EPOCH``) while a manager leads; clients only read it."""
    return f"{namespace}:{{mgr}}:lease"


async def active_manager(url: str, *, namespace: str) -> str | None:
    """Who holds the manager lease (``NAME@EPOCH``), or None when no manager is active."""
    client = aioredis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    try:
        holder = await client.get(manager_lease_key(namespace))
    except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
        raise BusUnavailable(f"cannot reach Redis at {redact_url(url)} to find the active manager: {exc}") from exc
    finally:
        await client.aclose()
    return holder.decode() if isinstance(holder, bytes) else holder


async def no_manager_reason(url: str, *, namespace: str) -> str:
    """Why nothing moves the namespace's runs (no manager holds the lease), or '' while a manager leads."""
    if await active_manager(url, namespace=namespace) is not None:
        return ""
    return (f"no manager holds the manager lease {manager_lease_key(namespace)!r}: the run is not moving; it goes on "
            "where it stopped when a manager starts (`orchestrator manager` or `orchestrator fleet up`)")


async def wait_for_manager(url: str, *, namespace: str, within_s: float, poll_s: float = 0.5) -> str:
    """The active manager, waiting up to ``within_s`` for one (a standby taking over, one starting up).

    Raises NoActiveManager, naming the lease it looked for, when none appears in time.
    """
    deadline = anyio.current_time() + within_s
    while (holder := await active_manager(url, namespace=namespace)) is None:
        if anyio.current_time() >= deadline:
            raise NoActiveManager(f"no active manager: nothing held the manager lease "
                                  f"{manager_lease_key(namespace)!r} at {redact_url(url)} for {within_s:.1f} s "
                                  "(start one with `orchestrator manager` or `orchestrator fleet up`)")
        await anyio.sleep(poll_s)
    return holder


HEAD_BYTES = 64 * 1024  # what a reader of a summary's head reads of it


async def fetch_head(bus: Bus, run_id: str) -> dict[str, Any] | None:
    """The run's summary without its tasks (``task_count`` and ``task_states`` count them), from its first bytes.

    A 100,000-task run's summary is 25 MB; its head is a few hundred bytes. A summary whose head is
    longer than ``HEAD_BYTES`` (a very long goal), or written by a manager that did not count its tasks,
    is read whole. None when the run is unknown.
    """
    raw = await bus.get_value_prefix(run_snapshot_key(run_id), HEAD_BYTES)
    if raw is None:
        return None
    # Inside a JSON string every quote is escaped, so the first unescaped ', "tasks": [' is the structure's.
    cut = raw.find(TASKS_START)
    if cut >= 0:
        head = dict(json.loads(raw[:cut] + b"}"))
        if "task_states" in head:
            return head
    status = await fetch_status(bus, run_id)
    if status is None:
        return None
    return summary_head(status)


def summary_head(status: Mapping[str, Any]) -> dict[str, Any]:
    """``status`` without its tasks, counted as ``fetch_head`` gives them (for summaries that lack the counts)."""
    tasks = status.get("tasks") or []
    states = Counter(str(task.get("state")) for task in tasks)
    return {**{k: v for k, v in status.items() if k != "tasks"}, "task_count": len(tasks),
            "task_states": dict(states)}


SUBMISSION_GONE_S = 5.0  # how long wait_for_run gives a run with neither a summary nor a submission


async def wait_for_run(bus: Bus, run_id: str, *, poll_s: float = 0.2) -> dict[str, Any]:
    """Poll the run's summary until it has ended; return the whole summary.

    What is polled is the summary's head (``fetch_head``): a 100,000-task run's summary is 25 MB, and
    reading and parsing it five times a second held a core and Redis's network for the whole run.
    SubmissionRefused when the manager dead-lettered the run's submission (its reason), or when neither
    the run nor its submission has existed for ``SUBMISSION_GONE_S``: no wait in silence for a run that
    will never start.
    """
    gone_since: float | None = None
    while True:
        head = await fetch_head(bus, run_id)
        if head is not None and head["state"] != "running":
            status = await fetch_status(bus, run_id)
            if status is not None and status["state"] != "running":
                return status
        if head is not None or await _queued_submission(bus, run_id) is not None:
            gone_since = None
        elif await fetch_head(bus, run_id) is None:  # again: a manager publishes the summary, then takes the submission
            if (why := await _refused_submission(bus, run_id)) is not None:
                raise SubmissionRefused(f"the manager refused the submission of run {run_id!r}: {why}")
            gone_since = gone_since if gone_since is not None else anyio.current_time()
            if anyio.current_time() - gone_since >= SUBMISSION_GONE_S:
                raise SubmissionRefused(f"run {run_id!r} has no summary and its submission is no longer in the "
                                        f"jobs stream, nor among its dead letters (deleted, or the data was lost)")
        await anyio.sleep(poll_s)


async def _refused_submission(bus: Bus, run_id: str, *, newest: int = 100) -> str | None:
    """Why the submission of ``run_id`` was dead-lettered, when it is among the newest dead letters of the jobs stream.

    The frames are read only for their run id (a refused frame may not decode, or verify); anyone who can
    write to Redis can write dead letters too, so the reason is cut short.
    """
    for dead in reversed(await bus.dead_letters(JOBS_STREAM, last=newest)):
        if len(dead.frame) > bus.settings.codec.max_frame_bytes:  # no submission is that big
            continue
        try:
            data = msgpack.unpackb(dead.frame, raw=False)
        except Exception:  # msgpack raises a dozen unrelated types on garbage
            continue
        if isinstance(data, dict) and data.get("run_id") == run_id:
            return dead.reason[:500]
    return None


async def send_override(bus: Bus, run_id: str, task_id: str, action: OverrideAction, *, feedback: str = "",
                        by: str) -> dict[str, Any]:
    """Send a person's decision to the active manager, after checking the run and task exist."""
    status = await fetch_status(bus, run_id)
    if status is None:
        raise UnknownRun(f"unknown run {run_id!r} (no manager has reported it, or it expired)")
    if task_id and task_id not in {t["id"] for t in status["tasks"]}:
        known = ", ".join(t["id"] for t in status["tasks"])
        raise ConfigError(f"run {run_id!r} has no task {task_id!r} (tasks: {known})")
    if status["state"] != "running":
        raise ConfigError(f"run {run_id!r} has already ended ({status['state']})")
    task = next((t for t in status["tasks"] if t["id"] == task_id), None)
    # The snapshot may be half a second old: this catches mistakes early; the manager has the last word.
    if task is not None:
        state, stage = TaskState(task["state"]), VerifyStage(task["stage"]) if task.get("stage") else None
        if not override_allowed(action, state, stage):
            allowed = " or ".join(f"{s}" + (f" (at {want})" if want else "") for s, want in OVERRIDE_RULES[action])
            raise ConfigError(f"cannot {action} task {task_id!r} of run {run_id!r} in state {task['state']!r} "
                              f"(it must be {allowed})")
    await bus.publish(OVERRIDES_STREAM, Envelope(run_id=run_id, task_id=task_id, sender=by,
                                                 body=Override(action=action, feedback=feedback, by=by)))
    return status


async def read_events(bus: Bus, run_id: str, *, wait_s: float = HISTORY_WAIT_S) -> list[Event]:
    """A run's history so far, in order, from the bus's copy of it.

    What the stream lacks of the history the run's summary counts (``last_seq``), the manager sends on
    request (``Follower``). NoActiveManager when that does not come within ``wait_s``.
    """
    follower = Follower(bus, run_id)
    last_seq = history_length(await fetch_status(bus, run_id))
    events = await follower.read_until(last_seq, wait_s=wait_s)
    if follower.seen < last_seq:
        raise NoActiveManager(f"run {run_id!r} has {last_seq} history entries and the bus has {follower.seen}: "
                              f"no manager sent the rest within {wait_s:g} s (a manager sends a run's history "
                              "to whoever follows it: is one running on this namespace? Its ledger has the "
                              "history too: orchestrator events RUN --ledger PATH)")
    return events


async def follow_events(bus: Bus, run_id: str, *, poll_s: float = 1.0) -> AsyncIterator[Event]:
    """A run's history, then its new events as the manager records them, until the run ends."""
    follower = Follower(bus, run_id)
    block_s = 0.0  # the first read takes what the stream has, so the follow says how far that goes
    while True:
        for event in await follower.read(block_s=block_s):
            yield event
            if isinstance(event.body, RunFinished):
                return
        await follower.ask()
        block_s = poll_s
