"""``LeaderLease`` through Redis outages: it waits for Redis, and steps down on the monotonic clock."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest
import redis.asyncio as aioredis
from structlog.testing import capture_logs

from orchestrator.leader import LeaderLease, LeadershipLost
from protocol.errors import BusUnavailable
from tests._redis import RedisServer, redis_server_path

pytestmark = [pytest.mark.redis, pytest.mark.timeout(30),
              pytest.mark.skipif(redis_server_path() is None, reason="redis-server is not on PATH; install Redis 7")]


@pytest.mark.usefixtures("debug_logs")
async def test_acquire_waits_for_a_redis_that_is_not_up_yet(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)  # down when the manager starts
    lease = LeaderLease(server.url, name="m", lease_s=1.0)
    try:
        epochs: list[int] = []
        with capture_logs() as logs:
            async with anyio.create_task_group() as tg:
                async def take() -> None:
                    epochs.append(await lease.acquire())

                tg.start_soon(take)
                await anyio.sleep(1.5)
                assert not epochs  # still waiting, not raised
                await anyio.to_thread.run_sync(server.start)
        assert epochs == [1]
        events = [e["event"] for e in logs]
        assert events[0] == "redis_unreachable"
        assert logs[0]["op"] == "the manager lease"
        assert "redis_reachable_again" in events
        assert events[-1] == "leadership_acquired"
    finally:
        await lease.aclose()
        server.kill()


@pytest.mark.usefixtures("debug_logs")
async def test_a_leader_that_cannot_renew_steps_down_when_its_lease_may_have_expired(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, appendonly=True).start()
    lease = LeaderLease(server.url, name="m", lease_s=1.0)
    try:
        assert await lease.acquire() == 1
        with pytest.raises(LeadershipLost, match="could not renew") as info:  # noqa: PT012 - the group below
            try:
                async with anyio.create_task_group() as tg:
                    await tg.start(lease.hold)
                    await anyio.sleep(0.5)
                    await anyio.to_thread.run_sync(server.kill)
                    killed = time.monotonic()
                    await anyio.sleep(10)  # hold raises long before this
            except* LeadershipLost as group:
                raise group.exceptions[0] from None
        # no later than one lease after the last renewal sent before the kill, and without Redis answering
        assert time.monotonic() - killed < 1.0 + 0.5, info.value
        await anyio.to_thread.run_sync(server.start)
        # Had Redis kept our token (say, its clock ran slow), it would be ours to drop, not to wait out.
        client = aioredis.Redis.from_url(server.url)
        try:
            await client.set("orch:{mgr}:lease", "m@1", px=60_000)
        finally:
            await client.aclose()
        with anyio.fail_after(5):
            assert await lease.acquire(poll_s=10) == 2
    finally:
        await lease.aclose()
        server.kill()


@pytest.mark.usefixtures("debug_logs")
async def test_with_exit_after_s_acquire_gives_up_with_bus_unavailable(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)  # never started
    lease = LeaderLease(server.url, name="m", lease_s=1.0, exit_after_s=0.5)
    try:
        started = time.monotonic()
        with anyio.fail_after(5), pytest.raises(BusUnavailable, match="for the manager lease: unreachable for"):
            await lease.acquire()
        assert time.monotonic() - started >= 0.5
    finally:
        await lease.aclose()
