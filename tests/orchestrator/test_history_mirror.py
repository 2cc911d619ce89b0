"""A run's history mirrored on Redis, for followers on other machines: kept a while after the run's last event."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from orchestrator import processes
from orchestrator.api import Orchestrator
from orchestrator.manager import ManagerSettings
from protocol.history import RunFinished
from protocol.keys import events_stream
from protocol.redis_bus import RedisBus
from workers import Task, Worker

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


class Echo(Worker):
    capability = "echo"

    async def handle(self, task: Task) -> Any:
        return task.input


async def test_a_finished_runs_history_on_redis_expires_snapshot_ttl_s_after_its_end(redis_url: str) -> None:
    bus = RedisBus.from_url(redis_url, namespace=f"mirror-{uuid.uuid4().hex[:8]}")
    async with Orchestrator(bus=bus, workers=[Echo], insecure=True,
                            manager_settings=ManagerSettings(snapshot_ttl_s=600)) as orch:
        run = await orch.submit({"goal": "g", "tasks": [{"id": "t", "capability": "echo", "input": 1}]})
        assert (await run.wait()).accepted
        with anyio.fail_after(10):  # mirrored after the commit that made the end durable: followed until then
            events = [event async for event in processes.follow_events(bus, run.run_id, poll_s=0.1)]
        raw = aioredis.Redis.from_url(redis_url)
        try:
            ttl = await raw.ttl(bus.key(events_stream(run.run_id)))
        finally:
            await raw.aclose()
    assert [e.seq for e in events] == list(range(1, len(events) + 1))  # the whole history, in order
    assert isinstance(events[-1].body, RunFinished)
    assert 590 <= ttl <= 600, ttl
