"""A worker runs as a Redis ACL user holding only the grants docs/bus.md lists for its capability."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from urllib.parse import urlsplit, urlunsplit

import anyio
import pytest
import redis.asyncio as aioredis

from orchestrator.api import Orchestrator
from protocol.bus import BusSettings
from protocol.envelope import Envelope
from protocol.errors import BusError
from protocol.messages import Assign
from protocol.redis_bus import RedisBus
from tests._trust import trust_as
from tests.observability.fakes import Echo
from workers.runtime import WorkerRuntime

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]

# docs/bus.md, "ACL grants": what the client sends, then what the scripts call.
CLIENT_COMMANDS = ("evalsha", "script|load", "xreadgroup", "xgroup|create", "xinfo|groups", "xlen", "xrange",
                   "publish", "subscribe", "client|setname", "ping")
SCRIPT_COMMANDS = ("xadd", "xack", "xdel", "xclaim", "xpending", "xinfo", "xrange", "xlen", "time", "zadd",
                   "zremrangebyscore", "pexpire")


def with_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port}"))


@pytest.fixture
async def worker_url(redis_url: str) -> AsyncIterator[tuple[str, str]]:
    """A namespace and a URL for an ACL user that may only serve capability ``echo`` in it."""
    namespace, user = f"acl{uuid.uuid4().hex[:8]}", f"worker-{uuid.uuid4().hex[:8]}"
    admin = aioredis.Redis.from_url(redis_url)
    await admin.acl_setuser(user, reset=True, enabled=True, passwords=["+pw"], keys=[f"{namespace}:{{cap.echo}}:*"],
                            channels=[f"{namespace}:ctl:*"],
                            commands=[f"+{c}" for c in CLIENT_COMMANDS + SCRIPT_COMMANDS])
    try:
        yield namespace, with_user(redis_url, user, "pw")
    finally:
        await admin.acl_deluser(user)
        await admin.aclose()


async def test_a_worker_with_only_the_documented_grants_serves_a_run(redis_url: str,
                                                                      worker_url: tuple[str, str]) -> None:
    namespace, url = worker_url
    settings = BusSettings(lease_s=2, block_s=0.05)
    job = {"goal": "echo as a restricted user",
           "tasks": [{"id": f"t{i}", "capability": "echo", "input": i, "spec": {"expect": i}} for i in range(5)]}
    worker_settings = replace(settings, codec=trust_as("worker:echo").codec())  # a worker signs its replies
    worker_bus = RedisBus.from_url(url, settings=worker_settings, namespace=namespace, retry_budget_s=5)
    async with Orchestrator(bus=RedisBus.from_url(redis_url, settings=settings, namespace=namespace),
                            workers=[], host_workers=False) as orch, \
            worker_bus, WorkerRuntime(worker_bus, {"echo": Echo()}).running():
        result = await (await orch.submit(job)).wait()
        assert await orch.bus.served(["echo"]) == {"echo": 1}  # its presence announcements got through
    assert result.accepted, result.record.state
    assert {t.output for t in result.record.tasks.values()} == set(range(5))


async def test_a_missing_grant_is_named_at_once(worker_url: tuple[str, str]) -> None:
    namespace, url = worker_url
    async with RedisBus.from_url(url, namespace=namespace, retry_budget_s=30) as bus:
        await bus.publish("tasks.echo", Envelope(body=Assign(capability="echo", instruction="")))
        with anyio.fail_after(5), pytest.raises(BusError) as info:  # not retried for 30 s as if Redis were down
            await bus.publish("tasks.other", Envelope(body=Assign(capability="other", instruction="")))
    message = str(info.value)
    assert "may not publish" in message
    assert "ACL grants" in message
    assert ":pw@" not in message
