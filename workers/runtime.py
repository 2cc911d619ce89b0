"""Host worker plugins on a bus: consume, run with bounded concurrency, heartbeat, cancel, drain.

One ``WorkerRuntime`` per process serves one or more capabilities. For each capability it
pulls at most ``concurrency`` deliveries at a time (a pulled entry is leased, so pulling more
than it can run would only let leases lapse), runs the handler under its time limit, and
commits the reply and the acknowledgement in one step. While a handler runs, its lease is
renewed and a heartbeat is sent. A ``cancel`` control message stops the matching handlers.
On stop, it takes no new work, lets in-flight handlers finish for ``drain_s``, and hands
back whatever is still running so another worker picks it up at once.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol, Self, cast

import anyio
import structlog
from anyio.abc import TaskStatus
from structlog.contextvars import bound_contextvars

from protocol.bus import Bus, Delivery
from protocol.envelope import Envelope, new_id
from protocol.errors import LeaseLost, ProtocolError
from protocol.inference import InferenceClient
from protocol.keys import CONTROL_TOPIC, results_stream, tasks_stream, workers_group
from protocol.messages import Assign, Cancel, Done, Failed, Heartbeat, Progress, Verdict, VerifyRequest, VerifyResponse
from protocol.tracing import Tracing
from workers.base import Task, Worker, WorkerContext

__all__ = ("RuntimeObserver", "RuntimeSettings", "WorkerRuntime")

log = structlog.get_logger("workers.runtime")

# The envelope a handler is working on, so a worker can report progress without passing ids around.
_current: ContextVar[tuple[Envelope, str] | None] = ContextVar("orchestrator_current_task", default=None)


@dataclass(frozen=True, slots=True)
class RuntimeSettings:
    """How a runtime behaves; the defaults suit an embedded run."""

    concurrency: int = 8
    default_timeout_s: float = 300.0
    drain_s: float = 10.0
    name: str = ""


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
    cancelled_by: str = ""


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
        self.name = self.settings.name or f"worker-{new_id()[:8]}"
        self._in_flight: dict[tuple[str, str], _InFlight] = {}
        self._accepting = True
        self._stopped = anyio.Event()
        self._finished = anyio.Event()  # set whenever an in-flight handler ends
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
        async with anyio.create_task_group() as tg, self.bus.subscribe(CONTROL_TOPIC) as control:
            tg.start_soon(self._watch_control, control)
            tg.start_soon(self._heartbeat)
            limiter = anyio.Semaphore(self.settings.concurrency)
            async with anyio.create_task_group() as consumers:
                for capability, worker in self.workers.items():
                    consumers.start_soon(self._consume, capability, worker, limiter, tg)
                log.info("worker_started", worker=self.name, capabilities=sorted(self.workers),
                         concurrency=self.settings.concurrency)
                task_status.started()
                await self._stopped.wait()
                consumers.cancel_scope.cancel()  # take nothing new, then let in-flight work finish
            await self._drain()
            tg.cancel_scope.cancel()
        log.info("worker_stopped", worker=self.name, completed=self.completed)

    async def _consume(self, capability: str, worker: Worker, limiter: anyio.Semaphore,
                       tg: anyio.abc.TaskGroup) -> None:
        # Closed explicitly when this loop ends (stop, cancel), so entries the bus read ahead and
        # never handed out are given back at once instead of waiting for their lease to expire.
        # (Every bus implements consume as an async generator.)
        consume = self.bus.consume(tasks_stream(capability), group=workers_group(capability), consumer=self.name)
        async with contextlib.aclosing(cast(AsyncGenerator[Delivery], consume)) as deliveries:
            await self._pull(capability, worker, limiter, tg, deliveries)

    async def _pull(self, capability: str, worker: Worker, limiter: anyio.Semaphore, tg: anyio.abc.TaskGroup,
                    deliveries: AsyncGenerator[Delivery]) -> None:
        while self._accepting:
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
            tg.start_soon(self._run, capability, worker, delivery, scope, limiter)

    async def _run(self, capability: str, worker: Worker, delivery: Delivery, scope: anyio.CancelScope,
                   limiter: anyio.Semaphore) -> None:
        env = delivery.envelope
        for observer in self.observers:
            observer.handler_started(capability, env)
        started = time.monotonic()
        outcome = "handed_back"
        try:
            with (bound_contextvars(run_id=env.run_id, task_id=env.task_id, attempt=env.attempt, worker=self.name),
                  self.tracing.span(f"{env.type} {capability}", parent=env.trace, kind="consumer",
                                    attributes={"orchestrator.run_id": env.run_id, "orchestrator.task_id": env.task_id,
                                                "orchestrator.attempt": env.attempt,
                                                "orchestrator.worker": self.name}) as span):
                with scope:
                    token = _current.set((env, capability))
                    try:
                        reply = await self._handle(capability, worker, env)
                    finally:
                        _current.reset(token)
                if scope.cancelled_caught:
                    entry = self._in_flight.get(_key(delivery))
                    if entry is None or not entry.cancelled_by:
                        return  # handed back during drain: another worker will redo it
                    reply = env.reply(Failed(error=f"cancelled: {entry.cancelled_by}", error_type="Cancelled",
                                             retryable=False), sender=self.name)
                outcome = _outcome(reply)
                if span is not None:
                    span.set_attribute("orchestrator.outcome", outcome)
                await self._commit(capability, delivery, reply)
        finally:
            if self.observers:
                duration = time.monotonic() - started
                for observer in self.observers:
                    observer.handler_finished(capability, env, outcome, duration)
            self._in_flight.pop(_key(delivery), None)
            self._finished.set()
            limiter.release()

    async def _handle(self, capability: str, worker: Worker, env: Envelope) -> Envelope:
        body = env.body
        if not isinstance(body, Assign | VerifyRequest):
            log.warning("unexpected_message_dropped", type=env.type)
            return env.reply(Failed(error=f"workers do not handle {env.type!r} messages", retryable=False),
                             sender=self.name)
        task = Task.from_assign(body, run_id=env.run_id, task_id=env.task_id, attempt=env.attempt)
        timeout = body.timeout_s if isinstance(body, Assign) and body.timeout_s else self.settings.default_timeout_s
        started = time.monotonic()
        log.info("task_received", type=env.type, capability=capability)
        tokens_before = self._tokens(env)
        try:
            with anyio.fail_after(timeout):
                if isinstance(body, VerifyRequest):
                    verdict = await worker.verify(task, body.output)
                    if isinstance(verdict, bool):
                        verdict = Verdict(passed=verdict, verifier=capability)
                    return env.reply(VerifyResponse(verdict=verdict), sender=self.name)
                output = await worker.handle(task)
        except TimeoutError:
            log.warning("task_timed_out", timeout_s=timeout)
            return env.reply(Failed(error=f"handler ran past its {_seconds(timeout)} time limit",
                                    error_type="TimeoutError"), sender=self.name)
        except Exception as exc:
            log.warning("task_raised", error_type=type(exc).__name__, error=str(exc))
            return env.reply(Failed(error=f"{type(exc).__name__}: {exc}", error_type=type(exc).__name__),
                             sender=self.name)
        self.completed += 1
        duration = time.monotonic() - started
        log.info("task_finished", duration_s=round(duration, 4))
        return env.reply(Done(output=output, duration_s=duration, self_check=worker.has_own_verify(),
                              tokens=self._tokens(env) - tokens_before), sender=self.name)

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
