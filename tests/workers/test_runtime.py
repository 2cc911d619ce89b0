"""The worker runtime on a real (in-process) bus: concurrency, leases, cancel, drain."""

from __future__ import annotations

from contextvars import ContextVar
from typing import Any

import anyio
import pytest

from protocol.bus import Bus, BusSettings, MemoryBus
from protocol.envelope import Envelope
from protocol.keys import CONTROL_TOPIC, MANAGER_GROUP, results_stream, tasks_stream
from protocol.messages import Assign, Cancel, Done, Failed
from workers import Task, Worker
from workers.runtime import RuntimeSettings, WorkerRuntime

pytestmark = pytest.mark.timeout(30)


class Slow(Worker):
    capability = "slow"
    started: anyio.Event | None = None
    running = 0
    peak = 0
    calls: list[str] = []

    async def handle(self, task: Task) -> Any:
        Slow.running += 1
        Slow.peak = max(Slow.peak, Slow.running)
        Slow.calls.append(task.task_id)
        if Slow.started is not None:
            Slow.started.set()
        try:
            await anyio.sleep(float(task.input))
        finally:
            Slow.running -= 1
        return task.task_id


@pytest.fixture(autouse=True)
def _reset() -> None:
    Slow.running = Slow.peak = 0
    Slow.calls = []
    Slow.started = anyio.Event()


def assign(task_id: str, seconds: float) -> Envelope:
    return Envelope(run_id="r", task_id=task_id, attempt=1, body=Assign(capability="slow", instruction="", input=seconds))


async def results(bus: Bus, n: int, within: float = 10.0) -> list[Envelope]:
    out: list[Envelope] = []
    with anyio.fail_after(within):
        async for d in bus.consume(results_stream("slow"), group=MANAGER_GROUP, consumer="m"):
            await bus.ack(d)
            if isinstance(d.envelope.body, Done | Failed):
                out.append(d.envelope)
                if len(out) == n:
                    return out
    return out


async def test_concurrency_is_bounded() -> None:
    bus = MemoryBus(BusSettings(lease_s=5, block_s=0.05))
    for i in range(6):
        await bus.publish(tasks_stream("slow"), assign(f"t{i}", 0.1))
    async with WorkerRuntime(bus, {"slow": Slow()}, RuntimeSettings(concurrency=2)).running():
        done = await results(bus, 6)
    assert sorted(e.task_id for e in done) == [f"t{i}" for i in range(6)]
    assert Slow.peak == 2


async def test_lease_is_renewed_so_a_long_task_is_not_run_twice() -> None:
    bus = MemoryBus(BusSettings(lease_s=0.2, block_s=0.02))
    await bus.publish(tasks_stream("slow"), assign("long", 1.0))
    async with WorkerRuntime(bus, {"slow": Slow()}, RuntimeSettings(name="a")).running(), \
            WorkerRuntime(bus, {"slow": Slow()}, RuntimeSettings(name="b")).running():
        [done] = await results(bus, 1)
    assert done.body == Done(output="long", duration_s=done.body.duration_s)  # type: ignore[union-attr]
    assert Slow.calls == ["long"]


async def test_cancel_message_stops_the_handler_and_reports_cancelled() -> None:
    bus = MemoryBus(BusSettings(lease_s=5, block_s=0.05))
    await bus.publish(tasks_stream("slow"), assign("t", 30))
    async with WorkerRuntime(bus, {"slow": Slow()}).running():
        with anyio.fail_after(5):
            await Slow.started.wait()  # type: ignore[union-attr]
        await bus.broadcast(CONTROL_TOPIC, Envelope(run_id="r", task_id="t", body=Cancel(reason="enough", by="bob")))
        [failed] = await results(bus, 1)
    assert isinstance(failed.body, Failed)
    assert failed.body.error == "cancelled: enough"
    assert failed.body.retryable is False


async def test_stop_hands_back_unfinished_work_to_another_worker_at_once() -> None:
    bus = MemoryBus(BusSettings(lease_s=30, block_s=0.05))  # a lease far longer than the test
    await bus.publish(tasks_stream("slow"), assign("t", 0.5))
    first = WorkerRuntime(bus, {"slow": Slow()}, RuntimeSettings(name="leaving", drain_s=0.05))
    async with first.running():
        with anyio.fail_after(5):
            await Slow.started.wait()  # type: ignore[union-attr]
    async with WorkerRuntime(bus, {"slow": Slow()}, RuntimeSettings(name="staying")).running():
        [done] = await results(bus, 1, within=5)
    assert done.sender == "staying"
    assert Slow.calls == ["t", "t"]


async def test_an_unencodable_output_is_reported_not_lost() -> None:
    class Weird(Worker):
        capability = "slow"

        async def handle(self, task: Task) -> Any:
            return {1, 2}  # a set cannot cross the wire

    bus = MemoryBus(BusSettings(lease_s=5, block_s=0.05))
    await bus.publish(tasks_stream("slow"), assign("t", 0))
    async with WorkerRuntime(bus, {"slow": Weird()}).running():
        [failed] = await results(bus, 1)
    assert isinstance(failed.body, Failed)
    assert "output could not be sent" in failed.body.error


_leaky: ContextVar[str] = ContextVar("leaky", default="unset")


class Leaky(Worker):
    """Sets a context variable and never resets it (as a plugin binding log fields might)."""

    capability = "slow"

    async def handle(self, task: Task) -> Any:
        seen = _leaky.get()
        _leaky.set(task.task_id)
        await anyio.lowlevel.checkpoint()
        return seen


async def test_what_a_handler_sets_in_its_context_does_not_reach_the_next_task() -> None:
    # Handlers share long-lived runner tasks; each call still gets a context of its own, as a task had.
    bus = MemoryBus(BusSettings(lease_s=5, block_s=0.05))
    for i in range(3):
        await bus.publish(tasks_stream("slow"), assign(f"t{i}", 0))
    async with WorkerRuntime(bus, {"slow": Leaky()}, RuntimeSettings(concurrency=1)).running():
        done = await results(bus, 3)
    assert [e.body.output for e in done] == ["unset"] * 3  # type: ignore[union-attr]
