"""``orchestrator manager --max-queue N``: a slow capability never holds more than N tasks in Redis."""

from __future__ import annotations

import anyio
import pytest

from tests.integration.harness import Cluster, effect_tasks

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(90)]


async def test_dispatch_waits_while_a_capability_is_full(cluster: Cluster) -> None:
    cluster.spawn("manager", ["manager", "--redis", cluster.url, "--ledger", str(cluster.ledger), "--lease-s", "5",
                               "--max-queue", "3"])
    cluster.worker(concurrency=1)
    n = 12
    run_id = await cluster.submit(cluster.write_job("slow", effect_tasks(n, sleep=0.15)))
    longest = 0
    async with cluster.bus() as bus:
        redis = bus._redis
        key = bus.key("tasks.effect")
        with anyio.fail_after(60):
            while (status := await cluster.status(run_id)) is None or status["state"] == "running":
                longest = max(longest, int(await redis.xlen(key)))
                await anyio.sleep(0.02)
    print(f"longest task stream: {longest} entries (limit 3)")
    assert status["state"] == "accepted"
    assert 1 <= longest <= 3
    assert cluster.check(status, n).passed
