"""``Manager.submit`` returns at once and dispatches the run only once the ledger has it."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import anyio

from orchestrator.api import Orchestrator
from orchestrator.ledger import SQLiteStore
from workers import Task, Worker


class LedgerWitness(Worker):
    """Answers with whether the manager's ledger file already held the task's run when the task arrived."""

    capability = "echo"

    def __init__(self, ledger: Path) -> None:
        super().__init__()
        self.ledger = ledger

    def handle(self, task: Task) -> Any:  # a plain def: runs in a thread, reads the file like another process
        with sqlite3.connect(self.ledger) as db:
            row = db.execute("SELECT state FROM runs WHERE run_id = ?", (task.run_id,)).fetchone()
        return {"run_in_ledger": row is not None}


async def test_a_run_is_durable_in_the_ledger_before_any_task_reaches_a_worker(tmp_path: Path) -> None:
    ledger = tmp_path / "ledger.db"
    async with Orchestrator(workers=[LedgerWitness(ledger)], store=SQLiteStore(ledger)) as orch:
        runs = [await orch.submit({"goal": f"run {i}", "tasks": [{"id": "t", "capability": "echo"}]})
                for i in range(20)]
        results = [await run.wait() for run in runs]
    assert [r.outputs["t"] for r in results] == [{"run_in_ledger": True}] * 20
    assert all(r.accepted for r in results)


async def test_a_run_cancelled_right_after_submit_ends_cancelled() -> None:
    # The cancel waits for the run's start (still under way in the background) instead of
    # failing with "not running on this manager", then stops the task in flight.
    async with Orchestrator(workers=[Sleeper()]) as orch:
        run = await orch.submit({"goal": "never mind", "tasks": [{"id": "t", "capability": "sleeper"}]})
        await run.cancel(by="alice", reason="changed my mind")
        result = await run.wait()
    assert result.state == "cancelled"
    assert result.record.tasks["t"].reason == "changed my mind"


class Sleeper(Worker):
    capability = "sleeper"

    async def handle(self, task: Task) -> Any:
        await anyio.sleep(60)
