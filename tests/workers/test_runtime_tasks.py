"""What the runtime does around a handler, over the in-memory bus and a real Redis.

A task's config merged over the worker's, sync handlers in threads, handlers that block the
event loop or run past their limit, and who a worker's own verdict is attributed to.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from pydantic import BaseModel, ConfigDict
from structlog.testing import capture_logs

from protocol.bus import Bus, BusSettings
from protocol.envelope import Envelope
from protocol.keys import CONTROL_TOPIC, MANAGER_GROUP, results_stream, tasks_stream
from protocol.messages import Assign, Cancel, Done, Failed, Verdict, VerifyRequest, VerifyResponse
from tests.conftest import BusFactory
from workers import Task, Worker
from workers.runtime import RuntimeSettings, WorkerRuntime

pytestmark = pytest.mark.timeout(60)

# Leases long enough that a handler which blocks the loop (and so its heartbeat) keeps its task.
SETTINGS = BusSettings(lease_s=5, block_s=0.05)


@pytest.fixture
async def bus(bus_factory: BusFactory) -> AsyncIterator[Bus]:
    async with await bus_factory(SETTINGS) as b:
        yield b


async def send(bus: Bus, body: Assign | VerifyRequest, task_id: str = "t") -> None:
    await bus.publish(tasks_stream(body.capability), Envelope(run_id="r", task_id=task_id, attempt=1, body=body))


async def replies(bus: Bus, capability: str, n: int = 1) -> list[Envelope]:
    """The next ``n`` replies (done, failed, verify response) on ``capability``'s results stream."""
    out: list[Envelope] = []
    with anyio.fail_after(20):
        async for d in bus.consume(results_stream(capability), group=MANAGER_GROUP, consumer="m"):
            await bus.ack(d)
            if isinstance(d.envelope.body, Done | Failed | VerifyResponse):
                out.append(d.envelope)
                if len(out) == n:
                    return out
    return out


async def one_reply(bus: Bus, worker: Worker, body: Assign | VerifyRequest,
                    settings: RuntimeSettings | None = None) -> Envelope:
    await send(bus, body)
    async with WorkerRuntime(bus, {worker.capability: worker}, settings).running():
        [reply] = await replies(bus, worker.capability)
    return reply


# --- a task's config ---------------------------------------------------------------------------


class EchoConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    suffix: str = "."
    repeat: int = 1


class Echo(Worker):
    capability = "echo"
    config_model = EchoConfig

    async def handle(self, task: Task) -> Any:
        config = task.config
        assert isinstance(config, EchoConfig)
        return f"{task.input}{config.suffix * config.repeat}"


class LaxConfig(BaseModel):  # pydantic's default: unknown keys are dropped without a word
    model_config = ConfigDict(frozen=True)

    suffix: str = "."


class Lax(Worker):
    capability = "lax"
    config_model = LaxConfig

    async def handle(self, task: Task) -> Any:
        return task.config.model_dump() if task.config else None


async def test_task_config_is_merged_over_the_workers_own(bus: Bus) -> None:
    reply = await one_reply(bus, Echo({"repeat": 3}), Assign(capability="echo", instruction="", input="hi",
                                                             config={"suffix": "!"}))
    assert isinstance(reply.body, Done)
    assert reply.body.output == "hi!!!"


async def test_without_task_config_the_worker_runs_with_its_own(bus: Bus) -> None:
    reply = await one_reply(bus, Echo({"suffix": "?"}), Assign(capability="echo", instruction="", input="hi"))
    assert isinstance(reply.body, Done)
    assert reply.body.output == "hi?"


@pytest.mark.parametrize("worker", [Echo(), Lax()], ids=["extra-forbidden", "extra-ignored"])
async def test_unknown_task_config_keys_fail_the_task_naming_them(bus: Bus, worker: Worker) -> None:
    reply = await one_reply(bus, worker, Assign(capability=worker.capability, instruction="", input="hi",
                                                config={"bogus_key": 1, "suffix": "!", "other": 2}))
    assert isinstance(reply.body, Failed)
    assert reply.body.retryable is False
    assert reply.body.error_type == "ConfigError"
    assert f"task config for capability {worker.capability!r} has unknown keys 'bogus_key', 'other'" \
        in reply.body.error


async def test_an_invalid_task_config_value_names_the_field(bus: Bus) -> None:
    reply = await one_reply(bus, Echo(), Assign(capability="echo", instruction="", config={"repeat": "many"}))
    assert isinstance(reply.body, Failed)
    assert reply.body.retryable is False
    assert "task config for capability 'echo' is invalid: field 'repeat':" in reply.body.error


# --- sync handlers, blocking handlers, time limits ---------------------------------------------


class Waiter(Worker):
    """A plain ``def`` handler that waits for the test to release it (from the event loop)."""

    capability = "waiter"

    def __init__(self) -> None:
        super().__init__()
        self.started = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()
        self.thread_names: list[str] = []

    def handle(self, task: Task) -> Any:
        self.thread_names.append(threading.current_thread().name)
        self.started.set()
        try:
            return "released" if self.release.wait(timeout=15) else "never released"
        finally:
            self.finished.set()


async def test_a_sync_handler_runs_in_a_thread_and_leaves_the_loop_free(bus: Bus) -> None:
    worker = Waiter()
    await send(bus, Assign(capability="waiter", instruction=""))
    async with WorkerRuntime(bus, {"waiter": worker}).running():
        # This coroutine can only run while the handler waits if the handler is not on the loop.
        assert await anyio.to_thread.run_sync(worker.started.wait, 10)
        worker.release.set()
        [reply] = await replies(bus, "waiter")
    assert isinstance(reply.body, Done)
    assert reply.body.output == "released"
    assert worker.thread_names != [threading.current_thread().name]


async def test_a_sync_handler_past_its_limit_fails_at_once_and_its_thread_is_left_behind(bus: Bus) -> None:
    worker = Waiter()
    await send(bus, Assign(capability="waiter", instruction="", timeout_s=0.2))
    with capture_logs() as logs:
        async with WorkerRuntime(bus, {"waiter": worker}).running():
            [reply] = await replies(bus, "waiter")  # while the thread still waits to be released
            assert not worker.finished.is_set()
            worker.release.set()
            assert await anyio.to_thread.run_sync(worker.finished.wait, 10)
    assert isinstance(reply.body, Failed)
    assert reply.body.error_type == "TimeoutError"
    assert reply.body.error == ("handler ran past its 0.2 s time limit; it runs in a thread, which cannot be "
                                "stopped: the thread was left to finish and its result will be dropped")
    assert any(e["event"] == "handler_thread_abandoned" and e["task_id"] == "t" for e in logs)


async def test_cancel_stops_waiting_for_a_sync_handler(bus: Bus) -> None:
    worker = Waiter()
    await send(bus, Assign(capability="waiter", instruction=""))
    async with WorkerRuntime(bus, {"waiter": worker}).running():
        assert await anyio.to_thread.run_sync(worker.started.wait, 10)
        await bus.broadcast(CONTROL_TOPIC, Envelope(run_id="r", task_id="t", body=Cancel(reason="enough")))
        [reply] = await replies(bus, "waiter")
        worker.release.set()
    assert isinstance(reply.body, Failed)
    assert reply.body.error == "cancelled: enough"


class Blocker(Worker):
    """An async handler that makes a blocking call, holding the event loop."""

    capability = "blocker"

    async def handle(self, task: Task) -> Any:
        # From its first step, so the step is on the loop when the deadline passes, however slow the machine.
        threading.Event().wait(float(task.input))  # a blocking call, like time.sleep
        return "woke"


async def test_an_async_handler_that_blocks_the_loop_is_logged_with_its_task(bus: Bus) -> None:
    with capture_logs() as logs:
        reply = await one_reply(bus, Blocker(), Assign(capability="blocker", instruction="", input=0.3),
                                RuntimeSettings(block_warn_s=0.1))
    assert isinstance(reply.body, Done)
    [warning] = [e for e in logs if e["event"] == "event_loop_blocked"]
    assert warning["log_level"] == "warning"
    assert warning["capability"] == "blocker"
    assert warning["task_id"] == "t"
    assert warning["blocked_s"] > 0.2


async def test_a_handler_blocking_the_loop_is_named_while_it_blocks(bus: Bus) -> None:
    class Stuck(Worker):
        """Holds the loop until the watchdog has named it (at most 10 s), so the test needs no timing."""

        capability = "stuck"

        async def handle(self, task: Task) -> Any:
            await anyio.lowlevel.checkpoint()
            for _ in range(1000):
                if any(e["event"] == "event_loop_still_blocked" for e in logs):
                    return "named"
                threading.Event().wait(0.01)
            return "never named"

    with capture_logs() as logs:
        reply = await one_reply(bus, Stuck(), Assign(capability="stuck", instruction=""),
                                RuntimeSettings(block_warn_s=0.1))
    assert isinstance(reply.body, Done)
    assert reply.body.output == "named"
    [warning] = [e for e in logs if e["event"] == "event_loop_still_blocked"]
    assert (warning["log_level"], warning["capability"], warning["task_id"]) == ("warning", "stuck", "t")
    assert warning["blocked_s"] >= 0.1  # rounded to the millisecond


async def test_an_async_handler_that_blocks_past_its_limit_times_out(bus: Bus) -> None:
    # The handler never reaches a checkpoint after its deadline, so no cancellation reaches it:
    # the runtime still refuses the late result.
    reply = await one_reply(bus, Blocker(), Assign(capability="blocker", instruction="", input=0.5, timeout_s=0.1),
                            RuntimeSettings(block_warn_s=0.1))
    assert isinstance(reply.body, Failed)
    assert reply.body.error_type == "TimeoutError"
    assert reply.body.error.startswith("handler ran past its 0.1 s time limit; it blocked the event loop for ")


async def test_an_async_handler_past_its_limit_is_cancelled(bus: Bus) -> None:
    class Sleeper(Worker):
        capability = "sleeper"

        async def handle(self, task: Task) -> Any:
            await anyio.sleep(30)

    reply = await one_reply(bus, Sleeper(), Assign(capability="sleeper", instruction="", timeout_s=0.1))
    assert isinstance(reply.body, Failed)
    assert reply.body.error == "handler ran past its 0.1 s time limit"


# --- a worker's own verify ---------------------------------------------------------------------


class Picky(Worker):
    capability = "picky"

    async def handle(self, task: Task) -> Any:
        return task.input

    async def verify(self, task: Task, output: Any) -> Verdict | bool:
        if output == "bool":
            return False
        if output == "named":
            return Verdict(passed=False, feedback="no", verifier="house rules")
        return Verdict(passed=False, feedback="too short")


class SyncPicky(Worker):
    capability = "syncpicky"

    def handle(self, task: Task) -> Any:
        return task.input

    def verify(self, task: Task, output: Any) -> Verdict | bool:
        return output == "ok"


@pytest.mark.parametrize(("worker", "output", "verifier"), [
    (Picky(), "short", "worker:picky"),
    (Picky(), "bool", "worker:picky"),
    (Picky(), "named", "house rules"),
    (SyncPicky(), "nope", "worker:syncpicky"),
])
async def test_a_workers_own_verdict_is_attributed_to_its_capability(bus: Bus, worker: Worker, output: str,
                                                                     verifier: str) -> None:
    reply = await one_reply(bus, worker, VerifyRequest(capability=worker.capability, instruction="", output=output))
    assert isinstance(reply.body, VerifyResponse)
    assert reply.body.verdict.passed is False
    assert reply.body.verdict.verifier == verifier
