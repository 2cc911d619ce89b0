"""``run_manager`` against a real Redis: leadership lost while running is not the end of the process."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import anyio
import pytest
import redis.asyncio as aioredis

from orchestrator import processes
from protocol.bus import MemoryBus
from protocol.keys import run_snapshot_key
from tests._trust import trust_as

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
        self.reads = 0

    async def get_value(self, key: str, *, max_bytes: int | None = None) -> bytes | None:
        self.reads += 1
        return await super().get_value(key, max_bytes=max_bytes)


async def test_waiting_for_a_big_run_reads_its_summary_less_often() -> None:
    bus = _CountingReads()
    big = {"run_id": "r", "state": "running", "tasks": [{"id": "x" * 1_000}] * 5_000}  # ~5 MB
    await bus.put_value(run_snapshot_key("r"), json.dumps(big).encode())

    async def end_in_a_second() -> None:
        await anyio.sleep(1.0)
        await bus.put_value(run_snapshot_key("r"), json.dumps({**big, "state": "accepted"}).encode())

    async with anyio.create_task_group() as tg:
        tg.start_soon(end_in_a_second)
        with anyio.fail_after(10):
            status = await processes.wait_for_run(bus, "r", poll_s=0.05)
    assert status["state"] == "accepted"
    assert bus.reads <= 4  # one read every half second (5 MB at 10 MB/s), not every 0.05 s (about 20)
