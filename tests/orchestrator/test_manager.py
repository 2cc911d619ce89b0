"""The manager end to end on the in-process bus: DAG order, verification, redo, budgets, cancel."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from orchestrator.api import Orchestrator
from orchestrator.manager import ManagerSettings
from orchestrator.store import MemoryStore
from protocol.errors import JobError
from protocol.history import Dispatched, RunFinished, Transitioned, WaitingChanged
from tests._history import verdicts
from workers import Task, Verdict, Worker

pytestmark = pytest.mark.timeout(30)


class Echo(Worker):
    """Returns its input; records the order and overlap of calls."""

    capability = "echo"
    log: list[tuple[str, float, float]] = []

    async def handle(self, task: Task) -> Any:
        start = time.monotonic()
        if isinstance(task.input, dict) and "sleep" in task.input:
            await anyio.sleep(task.input["sleep"])
        Echo.log.append((task.task_id, start, time.monotonic()))
        return task.input


class Learner(Worker):
    """Wrong until it has feedback; shows what it was told."""

    capability = "learner"

    async def handle(self, task: Task) -> Any:
        if not task.feedback:
            return "a long first draft"
        return "short"


class Stubborn(Worker):
    """Returns the same wrong answer whatever it is told."""

    capability = "stubborn"

    async def handle(self, task: Task) -> Any:
        return 3


class Flaky(Worker):
    """Raises on the first attempt, succeeds after."""

    capability = "flaky"

    async def handle(self, task: Task) -> Any:
        if task.attempt == 1:
            raise ValueError("disk on fire")
        return task.attempt


class Sleeper(Worker):
    capability = "sleeper"

    async def handle(self, task: Task) -> Any:
        await anyio.sleep(60)


class SelfChecking(Worker):
    """Has its own verify: accepts only outputs with an 'ok' key."""

    capability = "selfcheck"

    async def handle(self, task: Task) -> Any:
        return {"ok": True} if task.feedback else {"draft": True}

    async def verify(self, task: Task, output: Any) -> Verdict:
        passed = isinstance(output, dict) and output.get("ok") is True
        return Verdict(passed=passed, feedback="" if passed else "missing 'ok'")


ALL = [Echo, Learner, Stubborn, Flaky, Sleeper, SelfChecking]


def job(*tasks: dict[str, Any], **budget: Any) -> dict[str, Any]:
    return {"goal": "test", "tasks": list(tasks), "budget": budget}


async def run_job(data: dict[str, Any], **kwargs: Any) -> Any:
    async with Orchestrator(workers=ALL, **kwargs) as orch:
        run = await orch.submit(data)
        events = [e async for e in run.events()]
        return await run.wait(), events


def transitions(events: list[Any], task_id: str) -> list[tuple[int, str, str]]:
    return [(e.attempt, str(e.body.event), str(e.body.to_state)) for e in events
            if e.task_id == task_id and isinstance(e.body, Transitioned)]


async def test_every_result_goes_through_done_and_verify_done() -> None:
    result, events = await run_job(job({"id": "a", "capability": "echo", "input": 4,
                                         "spec": {"check": "tests.orchestrator.checks:is_even"}}))
    assert result.accepted
    assert transitions(events, "a") == [(1, "done", "done"), (1, "verify", "verify_done"), (1, "pass", "accepted")]
    assert result.to_dict()["tasks"] == [{"id": "a", "capability": "echo", "state": "accepted", "attempts": 1,
                                          "output": 4, "reason": "", "worker": result.record.tasks["a"].worker,
                                          "tokens": 0, "stage": None, "waiting": None}]


async def test_dependencies_run_in_order_and_independent_tasks_in_parallel() -> None:
    Echo.log.clear()
    result, _ = await run_job(job(
        {"id": "left", "capability": "echo", "input": {"sleep": 0.3}},
        {"id": "right", "capability": "echo", "input": {"sleep": 0.3}},
        {"id": "join", "capability": "echo", "input": "j", "depends_on": ["left", "right"]},
    ))
    assert result.accepted
    spans = {task_id: (start, end) for task_id, start, end in Echo.log}
    assert spans["left"][0] < spans["right"][1], "left and right overlap"
    assert spans["right"][0] < spans["left"][1], "left and right overlap"
    assert spans["join"][0] >= max(spans["left"][1], spans["right"][1])


async def test_dependency_outputs_reach_the_dependent_task() -> None:
    class Adder(Worker):
        capability = "adder"

        async def handle(self, task: Task) -> Any:
            return sum(task.dependencies.values()) + (task.input or 0)

    async with Orchestrator(workers=[Echo, Adder]) as orch:
        result = await orch.run(job({"id": "x", "capability": "echo", "input": 2},
                                    {"id": "y", "capability": "echo", "input": 3},
                                    {"id": "sum", "capability": "adder", "input": 10, "depends_on": ["x", "y"],
                                     "spec": {"expect": 15}}))
    assert result.accepted, result.reason


async def test_failed_verification_redoes_with_feedback_the_worker_sees() -> None:
    result, events = await run_job(job({"id": "t", "capability": "learner",
                                         "spec": {"check": "tests.orchestrator.checks:short"}}))
    assert result.accepted
    assert transitions(events, "t") == [
        (1, "done", "done"), (1, "verify", "verify_done"), (1, "reject", "redo"), (1, "redispatch", "not_done"),
        (2, "done", "done"), (2, "verify", "verify_done"), (2, "pass", "accepted"),
    ]
    assert verdicts(events, passed=False)[0].feedback == "18 characters; keep it to 10"
    assert result.record.tasks["t"].redo[0].feedback == "18 characters; keep it to 10"


async def test_redo_returning_the_same_output_is_reported_as_a_loop() -> None:
    result, _ = await run_job(job({"id": "t", "capability": "stubborn", "spec": {"expect": 4}},
                                       max_attempts=5))
    assert not result.accepted
    task = result.record.tasks["t"]
    assert task.state == "failed"
    assert task.attempt == 2
    assert task.reason.startswith("loop: attempt 2 returned the same output as attempt 1")
    assert "loop" in result.reason


async def test_attempts_budget_fails_the_task_and_the_run_with_the_reason() -> None:
    result, _ = await run_job(job({"id": "t", "capability": "echo", "input": 3,
                                   "spec": {"check": "tests.orchestrator.checks:is_even"}, "max_attempts": 1}))
    assert result.state == "failed"
    assert "failed verification on all 1 attempts" in result.record.tasks["t"].reason
    assert result.reason.startswith("task 't' failed")


async def test_handler_exception_becomes_failed_and_is_retried() -> None:
    result, events = await run_job(job({"id": "t", "capability": "flaky"}))
    assert result.accepted
    assert result.outputs == {"t": 2}
    retry = next(e.body for e in events if isinstance(e.body, Transitioned) and e.body.event == "retry")
    assert retry.error == "ValueError: disk on fire"


async def test_handler_exception_on_every_attempt_fails_the_run_with_the_error() -> None:
    result, _ = await run_job(job({"id": "t", "capability": "flaky", "max_attempts": 1}))
    assert result.state == "failed"
    assert "ValueError: disk on fire" in result.reason


async def test_handler_timeout_is_a_failure_with_the_limit_named() -> None:
    result, _ = await run_job(job({"id": "t", "capability": "sleeper", "timeout_s": 0.2, "max_attempts": 1}))
    assert result.state == "failed"
    assert "time limit" in result.record.tasks["t"].reason


async def test_run_deadline_fails_unfinished_tasks() -> None:
    result, _ = await run_job(job({"id": "t", "capability": "sleeper"}, deadline_s=0.3),
                              manager_settings=ManagerSettings(tick_s=0.05))
    assert result.state == "failed"
    assert "deadline" in result.reason


async def test_failed_dependency_cancels_dependents() -> None:
    result, _ = await run_job(job({"id": "bad", "capability": "flaky", "max_attempts": 1},
                                  {"id": "after", "capability": "echo", "depends_on": ["bad"]}))
    assert result.record.tasks["after"].state == "cancelled"
    assert "dependency 'bad' failed" in result.record.tasks["after"].reason


async def test_worker_own_verify_is_asked_and_its_feedback_drives_the_redo() -> None:
    result, events = await run_job(job({"id": "t", "capability": "selfcheck"}))
    assert result.accepted
    reject = verdicts(events, passed=False)[0]
    assert (reject.feedback, reject.verifier, reject.stage) == ("missing 'ok'", "worker:selfcheck", "worker")
    assert result.record.tasks["t"].attempt == 2


async def test_crashing_check_fails_verification_with_its_error() -> None:
    result, _ = await run_job(job({"id": "t", "capability": "echo", "input": 1, "max_attempts": 1,
                                   "spec": {"check": "tests.orchestrator.checks:explodes"}}))
    assert "RuntimeError: check is broken" in result.record.tasks["t"].reason


async def test_async_check_returning_a_verdict() -> None:
    result, _ = await run_job(job({"id": "t", "capability": "echo", "input": "yes",
                                   "spec": {"check": "tests.orchestrator.checks:async_verdict"}}))
    assert result.accepted


async def test_cancel_stops_a_running_task_and_ends_the_run_cancelled() -> None:
    async with Orchestrator(workers=ALL) as orch:
        run = await orch.submit(job({"id": "t", "capability": "sleeper"}))
        async for event in run.events():
            if isinstance(event.body, Dispatched):
                break
        await run.cancel(by="alice", reason="not needed")
        result = await run.wait()
    assert result.state == "cancelled"
    assert result.record.tasks["t"].reason == "not needed"


async def test_unknown_capability_is_rejected_before_anything_runs() -> None:
    async with Orchestrator(workers=[Echo]) as orch:
        with pytest.raises(JobError, match=r"task 'x': field 'capability': unknown capability 'nope'"):
            await orch.submit(job({"id": "x", "capability": "nope"}))


async def test_events_are_numbered_without_gaps_and_end_with_run_finished() -> None:
    result, events = await run_job(job({"id": "a", "capability": "echo"}, {"id": "b", "capability": "echo"}))
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert isinstance(events[-1].body, RunFinished)
    assert events[-1].body.state == "accepted"
    assert result.accepted


async def test_a_task_the_bus_dead_letters_fails_its_run_with_the_reason() -> None:
    from protocol.bus import BusSettings, MemoryBus
    from protocol.keys import tasks_stream, workers_group

    bus = MemoryBus(BusSettings(lease_s=0.05, max_deliveries=2, block_s=0.02))
    settings = ManagerSettings(incarnation_check_s=0.05)

    async def crashing_worker() -> None:  # takes the task and dies with it, every time
        async for _ in bus.consume(tasks_stream("ghost"), group=workers_group("ghost"), consumer="crasher"):
            pass

    async with Orchestrator(bus=bus, host_workers=False, manager_settings=settings) as orch, \
            anyio.create_task_group() as tg:
        tg.start_soon(crashing_worker)
        result = await orch.run({"goal": "g", "tasks": [{"id": "t", "capability": "ghost"}]})
        tg.cancel_scope.cancel()
    assert result.state == "failed"
    assert result.record.tasks["t"].reason.startswith("dead-lettered by the bus: delivered 2 times")


async def test_a_first_run_of_a_capability_does_not_wait_for_a_worker_that_is_there() -> None:
    # The presence check before the run saw no capability in use; the run's own must be looked up, not
    # taken as missing (its tasks recorded "waiting for a worker" until the next check, with one there).
    async with Orchestrator(workers=[Echo], manager_settings=ManagerSettings(incarnation_check_s=0.05)) as orch:
        await anyio.sleep(0.3)  # several presence checks, with no run yet
        run = await orch.submit(job({"id": "a", "capability": "echo", "input": 1, "spec": {"expect": 1}}))
        events = [e async for e in run.events()]
        assert (await run.wait()).accepted
    waits = [e.body.waiting for e in events if isinstance(e.body, WaitingChanged) and e.body.waiting is not None]
    assert waits == []


async def test_a_reply_tells_the_manager_a_worker_is_there_before_the_next_presence_check() -> None:
    # A fleet starting together: the lookup at the first submission came before the worker announced itself,
    # so the first run waits for a worker. Its reply proves one is there: a run started after it must not
    # record "waiting for a worker" until the next presence check (an hour away here).
    from protocol.bus import MemoryBus
    from workers.runtime import WorkerRuntime

    bus = MemoryBus()
    async with Orchestrator(bus=bus, host_workers=False,
                            manager_settings=ManagerSettings(incarnation_check_s=3600)) as orch:
        first = await orch.submit(job({"id": "a", "capability": "echo", "input": 1, "spec": {"expect": 1}}))
        async with WorkerRuntime(bus, {"echo": Echo()}).running():
            assert (await first.wait()).accepted
            second = await orch.submit(job({"id": "b", "capability": "echo", "input": 2, "spec": {"expect": 2}}))
            assert (await second.wait()).accepted
        first_events = [e async for e in first.events()]
        second_events = [e async for e in second.events()]

    def waits(events: list[Any]) -> list[str]:
        return [e.body.waiting.for_ for e in events
                if isinstance(e.body, WaitingChanged) and e.body.waiting is not None]

    assert waits(first_events) == ["worker"]  # nobody had announced: true when it was recorded
    assert waits(second_events) == []


class CountingStore(MemoryStore):
    """The in-memory store, counting the reads of runs and histories."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def get_run(self, run_id: str) -> Any:
        self.reads += 1
        return await super().get_run(run_id)

    async def events(self, run_id: str, after: int = 0) -> Any:
        self.reads += 1
        return await super().events(run_id, after)


async def test_waiting_on_runs_that_just_ended_reads_nothing_back_from_the_store() -> None:
    # Submit many, then wait for each: the latest finished runs (up to finished_tasks_kept tasks) come
    # from memory; older ones from the store, as before.
    store = CountingStore()
    async with Orchestrator(workers=ALL, store=store, manager_settings=ManagerSettings(finished_tasks_kept=30)) as orch:
        runs = [await orch.submit(job({"id": "a", "capability": "echo", "input": i})) for i in range(40)]
        with anyio.fail_after(10):
            for run in runs:  # to each run's end (from the manager's memory: no store reads)
                async for _ in run.events():
                    pass
        before = store.reads
        latest = [await run.wait() for run in runs[-30:]]
        assert store.reads == before
        oldest = [await run.wait() for run in runs[:10]]
        assert store.reads > before
    assert [r.outputs["a"] for r in oldest + latest] == [*range(10), *range(10, 40)]
    assert all(r.accepted for r in oldest + latest)



class Held(Worker):
    """Answers once the test lets it."""

    capability = "held"
    release: anyio.Event
    all_started: anyio.Event
    started = 0
    expected = 0

    async def handle(self, task: Task) -> Any:
        Held.started += 1
        if Held.started == Held.expected:
            Held.all_started.set()
        await Held.release.wait()
        return task.input


class StallingStore(MemoryStore):
    """The in-memory store, whose commits can be made to hang (a slow disk's fsync)."""

    def __init__(self) -> None:
        super().__init__()
        self.open = anyio.Event()
        self.open.set()

    async def sync(self) -> None:
        await self.open.wait()


async def test_replies_wait_on_the_bus_while_the_ledger_cannot_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    # Handled, a reply's records, history and receipt wait in memory for the next commit: a stalled commit must
    # not let all of a run's replies pile up there.
    monkeypatch.setattr("orchestrator.manager._UNCOMMITTED_REPLIES_MAX", 3)
    Held.release, Held.all_started, Held.started, Held.expected = anyio.Event(), anyio.Event(), 0, 20
    store = StallingStore()
    async with Orchestrator(workers=[Held], store=store, concurrency=20) as orch:
        run = await orch.submit(job(*({"id": f"t{i}", "capability": "held", "input": i, "spec": {"expect": i}}
                                      for i in range(20))))

        def accepted() -> int:
            return sum(t.state == "accepted" for t in orch.manager.snapshot(run.run_id).tasks.values())

        with anyio.fail_after(10):
            await Held.all_started.wait()  # every task dispatched, and held by the worker
            store.open = anyio.Event()  # commits hang from here on
            Held.release.set()
            async for event in run.events():  # the first reply handled (history is followed from memory)
                if isinstance(event.body, Transitioned) and event.body.to_state == "accepted":
                    break
        await anyio.sleep(0.5)  # time enough for all 20 replies, were they all taken
        # One reply went into the stalled commit, three more wait for it; the rest wait on the bus.
        assert 1 <= accepted() <= 4
        store.open.set()
        result = await run.wait()
    assert result.accepted
    assert all(t.state == "accepted" for t in result.record.tasks.values())


class Gate(Worker):
    """Waits until the test opens the gate."""

    capability = "gate"
    opened: anyio.Event | None = None

    async def handle(self, task: Task) -> Any:
        assert Gate.opened is not None
        await Gate.opened.wait()
        return task.input


async def test_runs_started_and_ended_together_each_get_their_summary_and_are_let_go() -> None:
    # First and final summaries go out gathered, one write for all the runs of a moment: each run must
    # still get its own, the final one last, and leave the manager's memory once it is out.
    import json

    from protocol.bus import MemoryBus
    from protocol.keys import run_snapshot_key

    bus = MemoryBus()
    Gate.opened = anyio.Event()

    async def summary(run_id: str) -> dict[str, Any] | None:
        raw = await bus.get_value(run_snapshot_key(run_id))
        return None if raw is None else json.loads(raw)

    async def states(runs: list[Any]) -> list[str | None]:
        return [None if (s := await summary(run.run_id)) is None else s["state"] for run in runs]

    async def eventually(check: Any) -> None:
        with anyio.fail_after(5):
            while True:
                if await check():
                    return
                await anyio.sleep(0.01)

    async with Orchestrator(bus=bus, workers=[Gate]) as orch:
        runs = [await orch.submit(job({"id": "t", "capability": "gate", "input": i, "spec": {"expect": i}}))
                for i in range(20)]

        async def under_way() -> bool:  # every run's first summary, while its task waits at the gate
            return await states(runs) == ["running"] * len(runs)

        async def ended_and_let_go() -> bool:  # the final summary replaced it, and the manager let the run go
            return (await states(runs) == ["accepted"] * len(runs)
                    and not any(run.run_id in orch.manager._engines for run in runs))

        await eventually(under_way)
        Gate.opened.set()
        results = [await run.wait() for run in runs]
        assert all(r.accepted for r in results)
        await eventually(ended_and_let_go)
        assert [(await summary(run.run_id) or {})["tasks"][0]["state"] for run in runs] == ["accepted"] * 20


async def test_runs_submitted_together_start_with_one_dispatch_write() -> None:
    from protocol.bus import MemoryBus

    class CountingBus(MemoryBus):
        dispatch_writes = 0

        async def publish_many(self, stream: str, envelopes: Any) -> list[str]:
            if stream.startswith("tasks."):
                self.dispatch_writes += 1
            return await super().publish_many(stream, envelopes)

    bus = CountingBus()
    async with Orchestrator(bus=bus, workers=[Echo]) as orch:
        runs: list[Any] = []

        async def submit(i: int) -> None:
            runs.append(await orch.submit(job({"id": "t", "capability": "echo", "input": i, "spec": {"expect": i}})))

        async with anyio.create_task_group() as tg:
            for i in range(50):
                tg.start_soon(submit, i)
        assert all([(await run.wait()).accepted for run in runs])
    assert len(runs) == 50
    assert bus.dispatch_writes <= 5  # one a run before the starts were gathered


async def test_a_batch_of_starts_that_fails_is_logged_and_the_next_runs_still_start() -> None:
    from structlog.testing import capture_logs

    class FailingOnce(MemoryStore):
        fail = True

        async def sync(self) -> None:
            if self.fail:
                self.fail = False
                raise OSError("disk full")
            await super().sync()

    store = FailingOnce()
    with capture_logs() as logs:
        async with Orchestrator(workers=[Echo], store=store) as orch:
            lost = await orch.submit(job({"id": "t", "capability": "echo", "input": 1}))
            with anyio.fail_after(5):  # the failed start is said, with the run's id
                while True:
                    if any(e["event"] == "runs_start_failed" for e in logs):
                        break
                    await anyio.sleep(0.01)
            later = await orch.submit(job({"id": "t", "capability": "echo", "input": 2, "spec": {"expect": 2}}))
            assert (await later.wait()).accepted
            record = await store.get_run(lost.run_id)
    [failed] = [e for e in logs if e["event"] == "runs_start_failed"]
    assert failed["run_ids"] == [lost.run_id]
    assert record is not None
    assert record.state == "running"  # in the ledger, for the next manager to resume
    assert record.tasks["t"].attempt == 0  # nothing went to a worker for it
