"""``run_manager`` against a real Redis: leadership lost while running is not the end of the process."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import anyio
import pytest
import redis.asyncio as aioredis

from orchestrator import processes
from orchestrator.api import Orchestrator
from protocol.bus import MemoryBus
from protocol.keys import run_snapshot_key
from tests._trust import trust_as
from workers.builtin.python import PythonWorker

pytestmark = pytest.mark.redis


async def test_manager_that_loses_its_lease_stands_by_and_leads_again(redis_url: str, tmp_path: Path) -> None:
    namespace = f"t{uuid.uuid4().hex[:10]}"
    client = aioredis.Redis.from_url(redis_url)
    leading = [anyio.Event(), anyio.Event()]

    async def on_ready() -> None:
        next(e for e in leading if not e.is_set()).set()

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(lambda: processes.run_manager(
                url=redis_url, ledger=tmp_path / "ledger.db", name="m", namespace=namespace, lease_s=1.0,
                manager_lease_s=0.3, ready=on_ready, trust=trust_as("manager")))
            with anyio.fail_after(10):
                await leading[0].wait()
                # Redis forgets the lease (restarted empty, or the key expired during an outage)
                await client.delete(f"{namespace}:{{mgr}}:lease")
                await leading[1].wait()
            assert int(await client.get(f"{namespace}:{{mgr}}:epoch")) == 2
            assert (await client.get(f"{namespace}:{{mgr}}:lease")) == b"m@2"
            tg.cancel_scope.cancel()
    finally:
        await client.aclose()


class _CountingReads(MemoryBus):
    def __init__(self) -> None:
        super().__init__()
        self.whole = 0  # reads of a whole value
        self.prefixes = 0

    async def get_value(self, key: str, *, max_bytes: int | None = None) -> bytes | None:
        self.whole += 1
        return await super().get_value(key, max_bytes=max_bytes)

    async def get_value_prefix(self, key: str, size: int) -> bytes | None:
        self.prefixes += 1
        return await super().get_value_prefix(key, size)


def _summary(run_id: str, state: str, tasks: int, goal: str = "g") -> bytes:
    """A summary as the manager writes it (RunRecord.summary: the head, its counts, then the tasks)."""
    items = [{"id": f"t{i}", "state": "accepted" if state == "accepted" else "not_done"} for i in range(tasks)]
    head = {"run_id": run_id, "goal": goal, "state": state, "reason": "", "tokens": 0, "held": 0, "created": 1.0,
            "last_seq": 1, "task_count": tasks, "task_states": {items[0]["state"]: tasks} if tasks else {}}
    return json.dumps({**head, "tasks": items}).encode()


async def test_waiting_for_a_big_run_reads_its_summary_whole_only_once_it_has_ended() -> None:
    bus = _CountingReads()
    await bus.put_value(run_snapshot_key("r"), _summary("r", "running", 50_000))  # ~2 MB

    async def end_in_a_second() -> None:
        await anyio.sleep(1.0)
        await bus.put_value(run_snapshot_key("r"), _summary("r", "accepted", 50_000))

    async with anyio.create_task_group() as tg:
        tg.start_soon(end_in_a_second)
        with anyio.fail_after(10):
            status = await processes.wait_for_run(bus, "r", poll_s=0.05)
    assert status["state"] == "accepted"
    assert len(status["tasks"]) == 50_000
    assert bus.whole == 1  # the end; every poll before it read the head's 64 KB
    assert bus.prefixes >= 10


@pytest.mark.parametrize("goal", ['a, "tasks": [1]} and \\", "tasks": [', "x" * 100_000])
async def test_a_summary_head_is_read_from_its_first_bytes_or_whole_when_it_must(goal: str) -> None:
    bus = _CountingReads()
    raw = _summary("r", "running", 3, goal=goal)
    await bus.put_value(run_snapshot_key("r"), raw)
    head = await processes.fetch_head(bus, "r")
    expected = {k: v for k, v in json.loads(raw).items() if k != "tasks"}
    assert head == expected
    assert bus.whole == (1 if len(goal) > processes.HEAD_BYTES else 0)  # a head past the first bytes: read whole
    assert await processes.fetch_head(bus, "nope") is None


async def test_a_summary_without_counts_from_an_older_manager_is_counted_here() -> None:
    bus = MemoryBus()
    old = {"run_id": "r", "goal": "g", "state": "running", "tasks": [{"id": "a", "state": "accepted"},
                                                                      {"id": "b", "state": "not_done"}]}
    await bus.put_value(run_snapshot_key("r"), json.dumps(old).encode())
    head = await processes.fetch_head(bus, "r")
    assert head == {"run_id": "r", "goal": "g", "state": "running", "task_count": 2,
                    "task_states": {"accepted": 1, "not_done": 1}}


async def test_the_managers_summary_has_a_head_that_counts_its_tasks() -> None:
    async with Orchestrator(workers=[PythonWorker]) as orch:
        run = await orch.submit({"goal": "counted", "tasks": [{"id": "a", "capability": "python",
                                                               "instruction": "result = 1"},
                                                              {"id": "b", "capability": "python", "depends_on": ["a"],
                                                               "instruction": "result = 2"}]})
        assert (await run.wait()).accepted
        status = await processes.ended_status(orch.bus, run.run_id)
        assert status is not None
        counting = _CountingReads()
        counting._values = orch.bus._values  # the same stored values, read through a counter
        head = await processes.fetch_head(counting, run.run_id)
    assert counting.whole == 0
    assert head == processes.summary_head(status)
    assert (head["task_count"], head["task_states"]) == (2, {"accepted": 2})
