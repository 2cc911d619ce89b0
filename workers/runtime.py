"""Host worker plugins on a bus: consume, run with bounded concurrency, heartbeat, cancel, drain.

One ``WorkerRuntime`` per process serves one or more capabilities. For each capability it
pulls at most ``concurrency`` deliveries at a time (a pulled entry is leased, so pulling more
than it can run would only let leases lapse), runs the handler under its time limit, and
commits the reply and the acknowledgement in one step. While a handler runs, its lease is
renewed and a heartbeat is sent. A ``cancel`` control message stops the matching handlers.
On stop, it takes no new work, lets in-flight handlers finish for ``drain_s``, and hands
back whatever is still running so another worker picks it up at once.

A task's ``config:`` is merged over the worker's own config (``Worker.task_config``); one the
worker's ``config_model`` refuses fails the task at once (not retryable). An ``async def``
handler runs on the event loop: each stretch of it that holds the loop longer than
``block_warn_s`` is logged (``event_loop_still_blocked`` by a watchdog thread while it lasts,
``event_loop_blocked`` when it ends), and a result that comes back after the time limit
counts as timed out. A plain ``def`` handler runs in a worker thread; when the time
limit passes (or the task is cancelled) the failure is sent at once and the thread, which
cannot be stopped, is left to finish and its result dropped.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import math
import threading
import time
import types
from collections.abc import AsyncGenerator, Awaitable, Callable, Generator, Mapping, Sequence
from contextlib import asynccontextmanager
from contextvars import Context, ContextVar, copy_context
from dataclasses import dataclass
from typing import Any, Protocol, Self, TypeVar, cast

import anyio
import structlog
from anyio.abc import TaskStatus
from structlog.contextvars import bind_contextvars, reset_contextvars

from protocol.bus import Bus, Delivery
from protocol.envelope import Envelope, new_id
from protocol.errors import ConfigError, LeaseLost, OrchestratorError, ProtocolError
from protocol.inference import InferenceClient
from protocol.keys import CONTROL_TOPIC, results_stream, tasks_stream, workers_group
from protocol.logging import enabled as logging_enabled
from protocol.messages import Assign, Cancel, Done, Failed, Heartbeat, Progress, Verdict, VerifyRequest, VerifyResponse
from protocol.tracing import NO_SPAN, Tracing
from workers.base import Task, Worker, WorkerContext
from workers.pool import RunnerPool

__all__ = ("RuntimeObserver", "RuntimeSettings", "WorkerRuntime")

log = structlog.get_logger("workers.runtime")

_T = TypeVar("_T")

# The envelope a handler is working on, so a worker can report progress without passing ids around.
_current: ContextVar[tuple[Envelope, str] | None] = ContextVar("orchestrator_current_task", default=None)


@dataclass(frozen=True, slots=True)
class RuntimeSettings:
    """How a runtime behaves; the defaults suit an embedded run.

    ``block_warn_s``: an ``async def`` handler that holds the event loop longer than this in one
    stretch (a blocking call) is logged with its capability and task.
    """

    concurrency: int = 8
    default_timeout_s: float = 300.0
    drain_s: float = 10.0
    name: str = ""
    presence_ttl_s: float = 10.0  # how long one announcement of this worker's capabilities lasts
    block_warn_s: float = 1.0


class RuntimeObserver(Protocol):
    """Told when each handler starts and ends (``protocol.metrics.WorkerMetrics`` is one); must be cheap."""

    def handler_started(self, capability: str, envelope: Envelope) -> None:
        """A handler began working on ``envelope`` (an assign or a verify request)."""

    def handler_finished(self, capability: str, envelope: Envelope, outcome: str, duration_s: float) -> None:
        """A handler ended: ``outcome`` is done, failed, timed_out, cancelled, verified or handed_back."""


@dataclass(slots=True)
class _InFlight:
    delivery: Delivery
    scope: anyio.CancelScope
    cancelled_by: str = ""  # who cancelled the task (a ``cancel`` message)
    handed_back: bool = False  # released to another worker as this one stops


class WorkerRuntime:
    """Serves ``workers`` (capability -> Worker instance) from ``bus`` until stopped."""

    def __init__(self, bus: Bus, workers: Mapping[str, Worker], settings: RuntimeSettings | None = None, *,
                 inference: InferenceClient | None = None, observers: Sequence[RuntimeObserver] = (),
                 tracing: Tracing | None = None) -> None:
        self.bus = bus
        self.observers = tuple(observers)
        self.tracing = tracing or Tracing.detect()
        self.inference = inference
        self.workers = dict(workers)
        self.settings = settings or RuntimeSettings()
        self.name = self.settings.name or f"worker-{new_id()[-8:]}"
        self._in_flight: dict[tuple[str, str], _InFlight] = {}
        self._accepting = True
        self._stopped = anyio.Event()
        self._finished = anyio.Event()  # set whenever an in-flight handler ends
        self._calls: set[_Call] = set()  # handler calls under way, for the loop watchdog
        self.completed = 0

    @asynccontextmanager
    async def running(self) -> AsyncGenerator[Self]:
        """Serve in the background for the duration of the ``async with`` block, then drain."""
        async with anyio.create_task_group() as tg:
            await tg.start(self.serve)
            try:
                yield self
            finally:
                self.stop()

    def stop(self) -> None:
        """Stop taking work; in-flight handlers get ``drain_s`` to finish before being handed back."""
        self._accepting = False
        self._stopped.set()

    async def serve(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Run until ``stop()``; ready (subscribed to control messages) when started."""
        # Plain ``def`` handlers run in threads of their own pool, so they never starve other to_thread users.
        self._threads = anyio.CapacityLimiter(self.settings.concurrency)
        with _LoopWatchdog(self._calls, self.settings.block_warn_s, name=f"{self.name} loop watchdog"):
            await self._serve(task_status)

    async def _serve(self, task_status: TaskStatus[None]) -> None:
        # The subscription outlives the task group, so the control watcher has ended before it closes.
        async with self.bus.subscribe(CONTROL_TOPIC) as control, anyio.create_task_group() as tg:
            tg.start_soon(self._watch_control, control)
            tg.start_soon(self._heartbeat)
            tg.start_soon(self._announce)
            # fast_acquire: a free place is taken without a turn of the event loop (two, by default, per task)
            limiter = anyio.Semaphore(self.settings.concurrency, fast_acquire=True)
            with RunnerPool(tg, self.settings.concurrency) as runners:
                async with anyio.create_task_group() as consumers:
                    for capability, worker in self.workers.items():
                        consumers.start_soon(self._consume, capability, worker, limiter, runners)
                    log.info("worker_started", worker=self.name, capabilities=sorted(self.workers),
                             concurrency=self.settings.concurrency)
                    task_status.started()
                    await self._stopped.wait()
                    consumers.cancel_scope.cancel()  # take nothing new, then let in-flight work finish
                await self._drain()
            tg.cancel_scope.cancel()
        log.info("worker_stopped", worker=self.name, completed=self.completed)

    async def _consume(self, capability: str, worker: Worker, limiter: anyio.Semaphore, runners: RunnerPool) -> None:
        # Closed explicitly when this loop ends (stop, cancel), so entries the bus read ahead and
        # never handed out are given back at once instead of waiting for their lease to expire.
        # (Every bus implements consume as an async generator.)
        consume = self.bus.consume(tasks_stream(capability), group=workers_group(capability), consumer=self.name)
        async with contextlib.aclosing(cast(AsyncGenerator[Delivery], consume)) as deliveries:
            await self._pull(capability, worker, limiter, runners, deliveries)

    async def _pull(self, capability: str, worker: Worker, limiter: anyio.Semaphore, runners: RunnerPool,
                    deliveries: AsyncGenerator[Delivery]) -> None:
        while self._accepting:
            # A free place is taken without anyio's cancellation checkpoint (a task lookup and a walk up its cancel
            # scopes, ~7 % of a no-op task's CPU): reading the next delivery is one whenever it waits for Redis, and
            # stop() ends this loop through _accepting.
            try:
                limiter.acquire_nowait()
            except anyio.WouldBlock:
                await limiter.acquire()
            if not self._accepting:
                limiter.release()
                return
            try:
                delivery = await anext(deliveries)
            except BaseException:
                limiter.release()
                raise
            scope = anyio.CancelScope()
            self._in_flight[_key(delivery)] = _InFlight(delivery, scope)
            runners.submit(self._run, capability, worker, delivery, scope, limiter)

    async def _run(self, capability: str, worker: Worker, delivery: Delivery, scope: anyio.CancelScope,
                   limiter: anyio.Semaphore) -> None:
        env = delivery.envelope
        for observer in self.observers:
            observer.handler_started(capability, env)
        started = time.monotonic()
        outcome = "handed_back"
        # Ids for every line logged while this task runs (this task's own context, so the tokens put
        # back what was there: cheaper than bound_contextvars, which copies the whole context).
        bound = bind_contextvars(run_id=env.run_id, task_id=env.task_id, attempt=env.attempt, worker=self.name)
        try:
            with self._task_span(env, capability) as span:
                token = _current.set((env, capability))
                try:
                    reply = await self._handle(capability, worker, delivery, scope)
                finally:
                    _current.reset(token)
                if reply is None:
                    return  # handed back during drain: another worker will redo it
                outcome = _outcome(reply)
                if span is not None:
                    span.set_attribute("orchestrator.outcome", outcome)
                await self._commit(capability, delivery, reply)
        finally:
            reset_contextvars(**bound)
            if self.observers:
                duration = time.monotonic() - started
                for observer in self.observers:
                    observer.handler_finished(capability, env, outcome, duration)
            self._in_flight.pop(_key(delivery), None)
            self._finished.set()
            limiter.release()

    def _task_span(self, env: Envelope, capability: str) -> contextlib.AbstractContextManager[Any]:
        if not self.tracing.enabled:  # per task: not even the name and attributes are built
            return NO_SPAN
        return self.tracing.span(f"{env.type} {capability}", parent=env.trace, kind="consumer",
                                 attributes={"orchestrator.run_id": env.run_id, "orchestrator.task_id": env.task_id,
                                             "orchestrator.attempt": env.attempt, "orchestrator.worker": self.name})

    async def _handle(self, capability: str, worker: Worker, delivery: Delivery,
                      scope: anyio.CancelScope) -> Envelope | None:
        """The reply to the delivered task, or None when the task was handed back (the runtime is stopping).

        ``scope`` is the task's one cancel scope: a ``cancel`` message or a hand-back cancels it, and it
        carries the time limit as its deadline (one scope a task, not two: each was a few per cent of a
        no-op task's CPU).
        """
        env = delivery.envelope
        body = env.body
        if not isinstance(body, Assign | VerifyRequest):
            log.warning("unexpected_message_dropped", type=env.type)
            return env.reply(Failed(error=f"workers do not handle {env.type!r} messages", retryable=False),
                             sender=self.name)
        if logging_enabled(logging.INFO):  # skip building the line when info is filtered (per task)
            log.info("task_received", type=env.type, capability=capability)
        try:
            config = worker.task_config(body.config)
        except ConfigError as exc:
            log.warning("task_config_rejected", capability=capability, error=str(exc))
            return env.reply(Failed(error=str(exc), error_type="ConfigError", retryable=False), sender=self.name)
        task = Task.from_assign(body, run_id=env.run_id, task_id=env.task_id, attempt=env.attempt, config=config)
        timeout = body.timeout_s or self.settings.default_timeout_s
        started = time.monotonic()
        tokens_before = self._tokens(env)
        call = _Call(capability=capability, run_id=env.run_id, task_id=env.task_id,
                     block_warn_s=self.settings.block_warn_s, deadline=time.monotonic() + timeout)
        self._calls.add(call)
        scope.deadline = anyio.current_time() + timeout
        try:
            with scope:
                if isinstance(body, VerifyRequest):
                    verdict = _attributed(await self._invoke(call, worker.verify, task, body.output), capability)
                else:
                    output = await self._invoke(call, worker.handle, task)
            if scope.cancelled_caught:
                entry = self._in_flight.get(_key(delivery))
                if entry is not None and entry.cancelled_by:
                    return env.reply(Failed(error=f"cancelled: {entry.cancelled_by}", error_type="Cancelled",
                                            retryable=False), sender=self.name)
                if entry is None or entry.handed_back:
                    return None
            # Past the limit: cancelled by it, or a handler that blocked the loop past it and then returned
            # without a checkpoint (never cancelled, and its result just as late).
            late = anyio.current_time() >= scope.deadline
        except Exception as exc:
            log.warning("task_raised", error_type=type(exc).__name__, error=str(exc))
            return env.reply(Failed(error=f"{type(exc).__name__}: {exc}", error_type=type(exc).__name__),
                             sender=self.name)
        finally:
            self._calls.discard(call)
            if call.abandoned:
                log.warning("handler_thread_abandoned", capability=capability, task_id=env.task_id)
        if late:
            log.warning("task_timed_out", capability=capability, task_id=env.task_id, timeout_s=timeout,
                        held_loop_s=round(call.held_past_deadline_s, 3) or None)
            return env.reply(Failed(error=_timeout_text(timeout, call), error_type="TimeoutError"), sender=self.name)
        if isinstance(body, VerifyRequest):
            return env.reply(VerifyResponse(verdict=verdict), sender=self.name)
        self.completed += 1
        duration = time.monotonic() - started
        if logging_enabled(logging.INFO):
            log.info("task_finished", duration_s=round(duration, 4))
        return env.reply(Done(output=output, duration_s=duration, self_check=worker.has_own_verify(),
                              tokens=self._tokens(env) - tokens_before), sender=self.name)

    async def _invoke(self, call: _Call, fn: Callable[..., Any], *args: Any) -> Any:
        """Await an ``async def`` handler on the loop, timing each step; run a plain ``def`` in a thread."""
        # A context of its own for the handler, as a task of its own had: what it binds (log fields, context
        # variables) and does not reset stays with this call, not with the runner's next one.
        context = copy_context()
        if inspect.iscoroutinefunction(fn):
            return await _timed(fn(*args), call, context)
        try:
            result = await anyio.to_thread.run_sync(functools.partial(fn, *args), abandon_on_cancel=True,
                                                    limiter=self._threads)
        except anyio.get_cancelled_exc_class():
            call.abandoned = True  # the thread runs on; what it returns goes nowhere
            raise
        if inspect.isawaitable(result):  # a plain def that returned a coroutine (a decorated async handler)
            result = await _timed(result, call, context)
        return result

    def _tokens(self, env: Envelope) -> int:
        """Tokens the shared inference client has spent on this task so far."""
        if self.inference is None:
            return 0
        return self.inference.usage.task(env.run_id, env.task_id).total_tokens

    async def _commit(self, capability: str, delivery: Delivery, reply: Envelope) -> None:
        try:
            await self.bus.commit(delivery, results_stream(capability), reply)
        except LeaseLost as exc:
            # Another worker owns the task now; its result counts, this one must not.
            log.warning("commit_refused", reason=str(exc))
        except ProtocolError as exc:
            log.warning("output_unencodable", error=str(exc))
            failed = reply.reply(Failed(error=f"output could not be sent: {exc}", retryable=False), sender=self.name)
            with contextlib.suppress(LeaseLost):
                await self.bus.commit(delivery, results_stream(capability), failed)

    async def _watch_control(self, control: Any) -> None:
        async for env in control:
            if not isinstance(env.body, Cancel):
                continue
            for entry in list(self._in_flight.values()):
                target = entry.delivery.envelope
                if target.run_id == env.run_id and env.task_id in ("", target.task_id):
                    entry.cancelled_by = env.body.reason or f"cancelled by {env.body.by or env.sender}"
                    entry.scope.cancel()
                    log.info("task_cancelled", run_id=target.run_id, task_id=target.task_id, by=env.body.by)

    async def _announce(self) -> None:
        """Tell managers which capabilities this process serves, so they can say when nobody does."""
        ttl = self.settings.presence_ttl_s
        while True:
            try:
                await self.bus.announce(self.name, self.workers, ttl_s=ttl)
            except OrchestratorError as exc:  # the bus rides out outages; presence resumes with it
                log.warning("presence_announce_failed", worker=self.name, error=str(exc))
            await anyio.sleep(ttl / 3)

    async def _heartbeat(self) -> None:
        interval = max(0.05, self.bus.settings.lease_s / 3)
        while True:
            await anyio.sleep(interval)
            for entry in list(self._in_flight.values()):
                try:
                    await self.bus.renew(entry.delivery)
                except LeaseLost:
                    log.warning("lease_lost", task_id=entry.delivery.envelope.task_id)
                    continue
                env = entry.delivery.envelope
                capability = entry.delivery.stream.removeprefix("tasks.")
                await self.bus.publish(results_stream(capability),
                                       env.reply(Heartbeat(in_flight=len(self._in_flight)), sender=self.name))

    async def _drain(self) -> None:
        with anyio.move_on_after(self.settings.drain_s):
            while self._in_flight:
                await self._finished.wait()
                self._finished = anyio.Event()
        # Handing back needs Redis; if it is away, give up after a lease, when the leases lapse anyway.
        give_up_at = anyio.current_time() + self.bus.settings.lease_s
        for entry in list(self._in_flight.values()):
            log.info("task_handed_back", task_id=entry.delivery.envelope.task_id)
            with anyio.move_on_after(max(0.0, give_up_at - anyio.current_time())):
                await self.bus.release(entry.delivery)
            entry.handed_back = True
            entry.scope.cancel()

    async def report_progress(self, message: str, fraction: float | None = None) -> None:
        """Send a progress note about the task the calling handler is working on."""
        current = _current.get()
        if current is None:
            raise RuntimeError("report_progress() must be called from inside a handler")
        env, capability = current
        await self.bus.publish(results_stream(capability),
                               env.reply(Progress(message=message, fraction=fraction), sender=self.name))

    def context_for(self, capability: str) -> WorkerContext:
        """The context a worker of ``capability`` hosted here should be built with."""
        return WorkerContext(name=self.name, logger=log.bind(worker=self.name, capability=capability),
                             progress=self.report_progress, inference=self.inference)


_BLOCKED_HINT = ("a blocking call in an async handler stalls every task of this process; "
                 "make handle a plain def (it then runs in a thread) or use anyio.to_thread")


@dataclass(slots=True, eq=False)
class _Call:
    """One handler call under way: its step on the loop now, a step that overran the deadline, an abandoned thread."""

    capability: str
    run_id: str
    task_id: str
    block_warn_s: float
    deadline: float  # time.monotonic()
    step_started: float | None = None  # read by the watchdog thread
    reported_step: float | None = None
    held_past_deadline_s: float = 0.0
    abandoned: bool = False

    def stepped(self, started: float) -> None:
        ended = time.monotonic()
        self.step_started = None
        seconds = ended - started
        if started < self.deadline <= ended:  # nothing could cancel it: the loop was not running
            self.held_past_deadline_s = seconds
        if seconds > self.block_warn_s:
            log.warning("event_loop_blocked", capability=self.capability, task_id=self.task_id,
                        blocked_s=round(seconds, 3), hint=_BLOCKED_HINT)


class _LoopWatchdog:
    """A thread that names the handler holding the event loop while it holds it (nothing on the loop can)."""

    def __init__(self, calls: set[_Call], warn_s: float, *, name: str) -> None:
        self._calls = calls
        self._warn_s = warn_s
        self._interval = max(0.05, warn_s / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=name, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(self._interval):
            now = time.monotonic()
            for call in list(self._calls):  # copied in one step under the GIL
                started = call.step_started
                if started is None or now - started <= self._warn_s or call.reported_step == started:
                    continue
                call.reported_step = started
                log.warning("event_loop_still_blocked", capability=call.capability, run_id=call.run_id,
                            task_id=call.task_id, blocked_s=round(now - started, 3), hint=_BLOCKED_HINT)


@types.coroutine
def _timed(awaitable: Awaitable[_T], call: _Call, context: Context) -> Generator[Any, Any, _T]:
    """Drive ``awaitable`` step by step (as ``await`` would) in ``context``, as a task runs its coroutine,
    telling ``call`` how long each step held the loop."""
    inner = awaitable.__await__()
    value: Any = None
    error: BaseException | None = None
    while True:
        started = call.step_started = time.monotonic()
        try:
            step = context.run(inner.send, value) if error is None else context.run(inner.throw, error)
        except StopIteration as stop:
            call.stepped(started)
            return cast(_T, stop.value)
        except BaseException:
            call.stepped(started)
            raise
        call.stepped(started)
        try:
            value, error = (yield step), None
        except GeneratorExit:
            inner.close()
            raise
        except BaseException as exc:  # a cancellation (or anything else) thrown in: hand it to the handler
            value, error = None, exc


def _timeout_text(timeout: float, call: _Call) -> str:
    text = f"handler ran past its {_seconds(timeout)} time limit"
    if call.abandoned:
        return (f"{text}; it runs in a thread, which cannot be stopped: the thread was left to finish and "
                "its result will be dropped")
    if call.held_past_deadline_s:
        return (f"{text}; it blocked the event loop for {call.held_past_deadline_s:.1f} s at once, so it could not "
                "be stopped in time (a blocking call in an async handler: make handle a plain def, or use "
                "anyio.to_thread)")
    return text


def _attributed(verdict: Any, capability: str) -> Verdict:
    """A worker's own verdict, attributed to ``worker:<capability>`` unless it names its verifier."""
    if isinstance(verdict, bool):
        return Verdict(passed=verdict, verifier=f"worker:{capability}")
    if not isinstance(verdict, Verdict):
        raise TypeError(f"verify returned {type(verdict).__name__}, not a Verdict or a bool")
    return verdict if verdict.verifier else verdict.model_copy(update={"verifier": f"worker:{capability}"})


def _outcome(reply: Envelope) -> str:
    body = reply.body
    if isinstance(body, Done):
        return "done"
    if isinstance(body, VerifyResponse):
        return "verified"
    if isinstance(body, Failed):
        return {"TimeoutError": "timed_out", "Cancelled": "cancelled"}.get(body.error_type, "failed")
    return "failed"


def _key(delivery: Delivery) -> tuple[str, str]:
    return delivery.stream, delivery.entry_id


def _seconds(value: float) -> str:
    return f"{value:g} s" if math.isfinite(value) else "unbounded"
