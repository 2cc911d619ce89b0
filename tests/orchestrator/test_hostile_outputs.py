"""Outputs a ledger cannot store fail the attempt that returned them, naming the limit; the manager goes on."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from orchestrator.api import Orchestrator
from orchestrator.ledger import SQLiteStore
from workers import Task, Worker

pytestmark = pytest.mark.timeout(30)


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


class Hostile(Worker):
    """Returns whatever its input names: a 300-level nesting, bytes that are not UTF-8, or a plain value."""

    capability = "hostile"

    async def handle(self, task: Task) -> Any:
        return {"deep": nested(300), "bytes": b"\xff\xfe", "fine": 4}[task.input]


@pytest.mark.parametrize(("kind", "why"), [("deep", "the output nests deeper than 64 levels (limit max_depth)"),
                                           ("bytes", "the output holds a bytes value; it must be JSON data")])
async def test_an_output_past_the_limits_fails_the_attempt_and_the_next_run_still_works(
        tmp_path: Any, kind: str, why: str) -> None:
    async with SQLiteStore(tmp_path / "ledger.db") as store, \
            Orchestrator(workers=[Hostile], store=store) as orch:
        with anyio.fail_after(20):
            bad = await orch.run({"goal": "g", "tasks": [{"id": "x", "capability": "hostile", "input": kind,
                                                          "max_attempts": 2}]})
            good = await orch.run({"goal": "g", "tasks": [{"id": "x", "capability": "hostile", "input": "fine"}]})
    task = bad.record.tasks["x"]
    assert (bad.state, task.state, task.attempt) == ("failed", "failed", 2)
    assert f"output rejected: {why}" in task.reason
    assert good.accepted
    assert good.outputs == {"x": 4}
