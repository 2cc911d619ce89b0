"""What a manager knows about live workers when a run starts: asked for a new capability, never waited out."""

from __future__ import annotations

import time
from pathlib import Path

import anyio
import pytest
from structlog.testing import capture_logs

from orchestrator.api import Orchestrator
from orchestrator.store import MemoryStore
from protocol.redis_bus import RedisBus
from tests._redis import RedisServer, redis_server_path

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60),
              pytest.mark.skipif(redis_server_path() is None, reason="redis-server is not on PATH; install Redis 7")]


@pytest.mark.usefixtures("debug_logs")
async def test_a_submission_during_an_outage_does_not_wait_for_the_bus_to_learn_presence(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    try:
        async with Orchestrator(bus=RedisBus.from_url(server.url, namespace="presence"), store=MemoryStore(),
                                host_workers=False, insecure=True) as orch:
            await anyio.to_thread.run_sync(server.kill)
            with capture_logs() as logs:
                started = time.monotonic()
                run = await orch.submit({"goal": "g", "tasks": [{"id": "t", "capability": "echo"}]})
                waited = time.monotonic() - started
            # The bus would retry for as long as the outage lasts; the lookup gives up after a second.
            assert waited < 10, waited
            assert run.run_id
            unknown = [e for e in logs if e["event"] == "presence_unknown"]
            assert unknown
            assert unknown[0]["capabilities"] == ["echo"]
    finally:
        server.kill()


async def test_a_manager_stopping_during_an_outage_gives_its_last_commit_two_seconds(tmp_path: Path) -> None:
    # On the way out the manager commits what it handled and mirrors the history (so followers see a run's
    # end); with Redis away that must not hold the stop for as long as the bus would retry.
    server = RedisServer(tmp_path).start()
    try:
        orch = Orchestrator(bus=RedisBus.from_url(server.url, namespace="drain"), store=MemoryStore(),
                            host_workers=False, insecure=True)
        with capture_logs() as logs:
            async with orch:
                run = await orch.submit({"goal": "g", "tasks": [{"id": "t", "capability": "echo"}]})
                await anyio.to_thread.run_sync(server.kill)
                started_event = orch.manager._logs[run.run_id].since(0)[0]
                orch.manager._acker.mirror(started_event)  # something surely left to mirror when the stop comes
                started = time.monotonic()
            stopped_in = time.monotonic() - started
        assert stopped_in < 8, stopped_in
        assert any(e["event"] == "last_commit_failed" or e["event"].startswith("redis_") for e in logs)
    finally:
        server.kill()
