"""The SQLite ledger: records survive the process, and a new manager resumes unfinished runs from it."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import anyio
import pytest
from pydantic_core import PydanticSerializationError

from orchestrator import Orchestrator, ledger
from orchestrator.engine import Instant, RunEngine, Start
from orchestrator.job import parse_job
from orchestrator.ledger import SQLiteStore
from orchestrator.manager import ManagerSettings
from orchestrator.records import RunRecord, TaskRecord
from orchestrator.store import MemoryStore
from protocol.bus import BusSettings, MemoryBus
from protocol.history import HistoryEvent, RunFinished, Transitioned
from tests._history import transitions
from workers import Task, Worker

pytestmark = pytest.mark.timeout(30)


class Step(Worker):
    capability = "step"
    executions: list[tuple[str, int]] = []

    async def handle(self, task: Task) -> Any:
        Step.executions.append((task.task_id, task.attempt))
        await anyio.sleep(0.05)
        return task.task_id


def chain(n: int) -> dict[str, Any]:
    tasks = [{"id": f"s{i}", "capability": "step", **({"depends_on": [f"s{i - 1}"]} if i else {})} for i in range(n)]
    return {"goal": "a chain", "tasks": tasks}


async def test_records_and_events_survive_reopening(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    async with Orchestrator(workers=[Step], store=SQLiteStore(path)) as orch:
        result = await orch.run(chain(3))
    assert result.accepted
    async with SQLiteStore(path) as store:
        run = await store.get_run(result.run_id)
        events = await store.events(result.run_id)
        assert await store.running_runs() == []
    assert isinstance(run, RunRecord)
    assert run.summary() == result.to_dict()
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert isinstance(events[-1].body, RunFinished)


async def test_a_new_manager_resumes_an_unfinished_run(tmp_path: Path) -> None:
    Step.executions = []
    path = tmp_path / "ledger.db"
    bus = MemoryBus(BusSettings(lease_s=0.3, block_s=0.02))  # the "broker" outlives both managers
    async with Orchestrator(bus=bus, workers=[Step], store=SQLiteStore(path)) as first:
        run = await first.submit(chain(6))
        accepted = 0
        async for event in run.events():
            accepted += isinstance(event.body, Transitioned) and event.body.to_state == "accepted"
            if accepted == 2:
                break  # the first manager "dies" here, mid-run
    async with Orchestrator(bus=bus, workers=[Step], store=SQLiteStore(path)) as second:
        result = await second.attach(run.run_id).wait()
    assert result.accepted, result.reason
    assert result.outputs == {f"s{i}": f"s{i}" for i in range(6)}
    for i in range(6):
        assert result.record.tasks[f"s{i}"].state == "accepted"
    # every task is accepted exactly once in the history, even if some attempt ran twice
    async with SQLiteStore(path) as store:
        passes = [e.task_id for e in transitions(await store.events(run.run_id), "pass")]
    assert sorted(passes) == [f"s{i}" for i in range(6)]


async def test_submitting_the_same_run_id_twice_starts_one_run(tmp_path: Path) -> None:
    async with Orchestrator(workers=[Step], store=SQLiteStore(tmp_path / "l.db")) as orch:
        job = parse_job(chain(1))
        first = await orch.manager.submit(job, run_id="fixed-id")
        second = await orch.manager.submit(job, run_id="fixed-id")
        result = await orch.attach(first).wait()
    assert first == second == "fixed-id"
    assert result.accepted


class ReadCountingLedger(SQLiteStore):
    """The ledger, counting the runs read back whole."""

    reads = 0

    async def get_run(self, run_id: str) -> RunRecord | None:
        self.reads += 1
        return await super().get_run(run_id)


async def test_a_run_submitted_again_after_it_left_memory_is_known_without_reading_it_back(tmp_path: Path) -> None:
    # A submission delivered again (the manager stopped before acknowledging it) names a run the ledger has;
    # reading a 100,000-task run whole to learn that took seconds and hundreds of MB.
    store = ReadCountingLedger(tmp_path / "l.db")
    async with Orchestrator(workers=[Step], store=store, manager_settings=ManagerSettings(finished_tasks_kept=0)) as orch:
        first = await orch.manager.submit(parse_job(chain(2)), run_id="fixed-id")
        assert (await orch.attach(first).wait()).accepted
        with anyio.fail_after(10):
            while "fixed-id" in orch.manager._engines:  # noqa: ASYNC110 (let go of once its end is durable)
                await anyio.sleep(0.01)
        reads = store.reads
        assert await orch.manager.submit(parse_job(chain(2)), run_id="fixed-id") == "fixed-id"
        assert store.reads == reads
        assert await store.has_run("fixed-id")
        assert not await store.has_run("other-id")
    assert await MemoryStore().has_run("fixed-id") is False


def _wide_run(n: int) -> RunRecord:
    return RunRecord.new(parse_job({"goal": "wide", "tasks": [{"id": f"t{i}", "capability": "step"} for i in range(n)]}),
                         "wide-run", now=1.0)


def _start(run: RunRecord) -> list[tuple[TaskRecord | None, HistoryEvent]]:
    """What the engine's start of ``run`` changed: each task dispatched, one event each and one for the run."""
    effects = RunEngine(run).apply(Start(Instant(1.0, 0.0)))
    return [(run.tasks.get(e.task_id) if e.task_id else None, e) for e in effects if isinstance(e, HistoryEvent)]


@pytest.fixture
def big_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """Batches of more than 10,000 rows take the big-batch path (50,000 in production: a slow test)."""
    monkeypatch.setattr(ledger, "_BIG_BATCH_ROWS", 10_000)


@pytest.mark.usefixtures("big_batches")
async def test_a_big_batch_is_written_whole(tmp_path: Path) -> None:
    # 12,000 task rows and 12,001 events: written a slice at a time, committed as one.
    run = _wide_run(12_000)
    async with SQLiteStore(tmp_path / "l.db") as store:
        await store.create_run(run)
        await store.record_all(run, _start(run))
        await store.sync()
    async with SQLiteStore(tmp_path / "l.db") as store:
        back = await store.get_run(run.run_id)
        events = await store.events(run.run_id)
    assert back is not None
    assert list(back.tasks) == [f"t{i}" for i in range(12_000)]  # in the job's order
    assert {t.attempt for t in back.tasks.values()} == {1}
    assert [e.seq for e in events] == list(range(1, 12_002))


@pytest.mark.usefixtures("big_batches")
async def test_a_big_batch_that_cannot_be_written_leaves_nothing_half_done(tmp_path: Path) -> None:
    run = _wide_run(12_000)
    async with SQLiteStore(tmp_path / "l.db") as store:
        await store.create_run(run)
        await store.sync()
        changes = _start(run)
        run.tasks["t11000"].output = object()  # not JSON: its row, in the third slice, fails to serialize
        await store.record_all(run, changes)
        with pytest.raises(PydanticSerializationError, match="object"):
            await store.sync()
        # The connection is usable afterwards, and nothing of the failed batch was committed.
        run.tasks["t11000"].output = None
        await store.record(run, run.tasks["t0"], changes[1][1])
        await store.sync()
    async with SQLiteStore(tmp_path / "l.db") as store:
        back = await store.get_run(run.run_id)
        events = await store.events(run.run_id)
    assert back is not None
    assert [e.seq for e in events] == [changes[1][1].seq]
    assert [t.id for t in back.tasks.values() if t.attempt] == ["t0"]


@pytest.mark.usefixtures("big_batches")
async def test_a_big_run_is_created_a_slice_at_a_time_with_the_event_loop_free_between(tmp_path: Path) -> None:
    # Its rows went into the next sync's batch, serialized and inserted without a pause (~1 s at 100,000).
    run = _wide_run(12_000)  # three slices of 5,000
    turns = 0

    async def other_work() -> None:
        nonlocal turns
        while True:
            await anyio.lowlevel.checkpoint()
            turns += 1

    async with SQLiteStore(tmp_path / "l.db") as store, anyio.create_task_group() as tg:
        tg.start_soon(other_work)
        await anyio.lowlevel.checkpoint()
        before = turns
        await store.create_run(run)
        during = turns - before
        tg.cancel_scope.cancel()
        # Committed by create_run itself: another connection sees every row before any sync.
        with sqlite3.connect(tmp_path / "l.db") as other:
            assert other.execute("SELECT count(*) FROM tasks").fetchone() == (12_000,)
    async with SQLiteStore(tmp_path / "l.db") as store:
        back = await store.get_run(run.run_id)
    assert during >= 3
    assert back is not None
    assert list(back.tasks) == [f"t{i}" for i in range(12_000)]


@pytest.mark.usefixtures("big_batches")
async def test_a_big_run_that_cannot_be_created_leaves_nothing_behind(tmp_path: Path) -> None:
    run = _wide_run(12_000)
    run.tasks["t11000"].input = object()  # not JSON: its row, in the third slice, fails to serialize
    async with SQLiteStore(tmp_path / "l.db") as store:
        with pytest.raises(PydanticSerializationError, match="object"):
            await store.create_run(run)
        assert await store.get_run(run.run_id) is None
        small = _wide_run(3)
        await store.create_run(small)  # the store is usable afterwards
        await store.sync()
        assert await store.get_run(small.run_id) is not None


async def test_a_live_run_keeps_each_definition_once_and_the_ledger_each_in_its_task_row(tmp_path: Path) -> None:
    job = parse_job(chain(3))
    async with Orchestrator(workers=[Step], store=SQLiteStore(tmp_path / "l.db")) as orch:
        run = await orch.submit(job)
        live = orch.manager.snapshot(run.run_id)
        result = await run.wait()
    assert result.accepted
    assert live.job.tasks == ()
    assert live.job.goal == job.goal
    assert live.job.budget == job.budget
    assert [t.instruction for t in live.tasks.values()] == [t.instruction for t in job.tasks]
    async with SQLiteStore(tmp_path / "l.db") as store:
        stored_job, order = await anyio.to_thread.run_sync(lambda: store.db.execute(
            "SELECT job, task_order FROM jobs WHERE run_id = ?", (run.run_id,)).fetchone())
        back = await store.get_run(run.run_id)
    # The job row is the job without its tasks, and their order; each definition is in its task's row.
    assert parse_job(json.loads(stored_job)) == job.model_copy(update={"tasks": ()})
    assert json.loads(order) == ["s0", "s1", "s2"]
    assert back is not None
    assert [(t.id, t.capability, t.depends_on) for t in back.tasks.values()] == [
        (t.id, t.capability, t.depends_on) for t in job.tasks]


def _wal_bytes(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


async def test_recording_a_transition_does_not_write_the_job_again(tmp_path: Path) -> None:
    # SQLite rewrites a whole row when one of its columns changes: with the job in the run row, which
    # changes at every commit, each commit of a big run wrote its whole job to the log again.
    path = tmp_path / "l.db"
    run = RunRecord.new(parse_job({"goal": "big job", "tasks": [
        {"id": f"t{i}", "capability": "step", "instruction": "x" * 4000} for i in range(250)]}), "big-job", now=1.0)
    changes = _start(run)
    async with SQLiteStore(path) as store:
        await store.create_run(run)
        await store.sync()
        assert _wal_bytes(path) > 1_000_000  # the job (1 MB) is written once
        await anyio.to_thread.run_sync(lambda: store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
        assert _wal_bytes(path) == 0
        run.elapsed_s = 12.5  # the run row grows a little, as it does at most commits
        await store.record(run, run.tasks["t0"], changes[1][1])
        await store.sync()
        assert 0 < _wal_bytes(path) < 100_000  # a run row, a task row and an event: a few pages


async def test_a_ledger_written_with_jobs_in_the_run_rows_opens_and_moves_them(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    async with Orchestrator(workers=[Step], store=SQLiteStore(path)) as orch:
        result = await orch.run(chain(2))
    # Back to the layout before the jobs table: the whole job in its run row, no jobs table.
    with sqlite3.connect(path) as db:
        db.execute("UPDATE runs SET job = ?", (parse_job(chain(2)).model_dump_json(by_alias=True),))
        db.execute("DROP TABLE jobs")
    async with SQLiteStore(path) as store:
        back = await store.get_run(result.run_id)
        moved = await anyio.to_thread.run_sync(
            lambda: store.db.execute("SELECT (SELECT count(*) FROM jobs), (SELECT job FROM runs)").fetchone())
    assert back is not None
    assert back.summary() == result.to_dict()
    assert moved == (1, "")
