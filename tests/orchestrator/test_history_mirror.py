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
from orchestrator.records import events_envelope
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


async def test_followers_read_an_event_the_manager_sent_twice_once(redis_url: str) -> None:
    # A mirror send cut short as the manager stops goes again at its last commit: it may have been out already.
    ns = uuid.uuid4().hex[:8]
    async with Orchestrator(bus=RedisBus.from_url(redis_url, namespace=f"mirror-{ns}"), workers=[Echo],
                            insecure=True) as orch:
        run = await orch.submit({"goal": "g", "tasks": [{"id": f"t{i}", "capability": "echo", "input": i}
                                                        for i in range(3)]})
        assert (await run.wait()).accepted
        history = [event async for event in run.events()]
    assert len(history) >= 8
    async with RedisBus.from_url(redis_url, namespace=f"again-{ns}") as bus:
        for chunk in (history[:4], history[2:5], history[4:5], history[3:]):  # overlapping resends
            await bus.publish(events_stream(run.run_id), events_envelope(run.run_id, chunk, "manager"))
        read = await processes.read_events(bus, run.run_id)
        with anyio.fail_after(10):
            followed = [event async for event in processes.follow_events(bus, run.run_id, poll_s=0.1)]
    assert [e.seq for e in read] == [e.seq for e in followed] == [e.seq for e in history]
