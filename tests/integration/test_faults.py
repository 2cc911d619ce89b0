"""Fault tests with real processes: see the "Fault tests" section of docs/bus.md.

Each test owns a redis-server on a free port and real ``orchestrator manager`` / ``worker``
subprocesses (killed by pid at the end), and ends with the checker line.
"""

from __future__ import annotations

import random
import signal
import time

import anyio
import pytest

from tests.integration.harness import Cluster, effect_tasks

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(90)]


def _assert_clean(result, extra: str = "") -> None:  # type: ignore[no-untyped-def]
    assert result.passed, f"{result.line()} {extra}"


async def test_baseline_no_faults(cluster: Cluster) -> None:
    cluster.manager()
    for i in range(3):
        cluster.supervised_worker(f"w{i}")
    n = 300
    started = time.monotonic()
    run_id = await cluster.submit(cluster.write_job("baseline", effect_tasks(n, sleep=0.02)))
    status = await cluster.wait(run_id, timeout=60)
    print(f"baseline: {n} tasks in {time.monotonic() - started:.1f}s")
    _assert_clean(cluster.check(status, n))


async def test_kill_busy_worker_every_2s(cluster: Cluster) -> None:
    """T1: SIGKILL a random busy worker every ~2 s; the supervisor restarts it under a new name."""
    cluster.manager()
    for i in range(3):
        cluster.supervised_worker(f"w{i}")
    n = 300
    run_id = await cluster.submit(cluster.write_job("kill-worker", effect_tasks(n, sleep=0.05)))
    rng = random.Random(1)
    faults: list[float] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(cluster.supervise)
        while len(faults) < 20:
            await anyio.sleep(2.0)
            status = await cluster.status(run_id)
            if status is not None and status["state"] != "running":
                break
            victim = cluster.slots[rng.choice(sorted(cluster.slots))]
            faults.append(time.time())
            victim.signal(signal.SIGKILL)
        status = await cluster.wait(run_id, timeout=60)
        tg.cancel_scope.cancel()
    result = cluster.check(status, n, faults)
    assert faults, "the run ended before any fault was injected; make it longer"
    _assert_clean(result, f"kills={len(faults)} restarts={cluster.restarts}")
