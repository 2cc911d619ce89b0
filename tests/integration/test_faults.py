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
    run_id = await cluster.submit(cluster.write_job("kill-worker", effect_tasks(n, sleep=0.2)))
    rng = random.Random(1)
    faults: list[tuple[float, int | None]] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(cluster.supervise)
        while len(faults) < 20:
            await anyio.sleep(2.0)
            status = await cluster.status(run_id)
            if status is not None and status["state"] != "running":
                break
            victim = cluster.slots[rng.choice(sorted(cluster.slots))]
            faults.append((time.time(), victim.pid))
            victim.signal(signal.SIGKILL)
        status = await cluster.wait(run_id, timeout=60)
        tg.cancel_scope.cancel()
    result = cluster.check(status, n, faults)
    assert len(faults) >= 3, "the run ended before three faults were injected; make it longer"
    # a killed worker's tasks come back after its lease (1 s) + reclaim; allow lease x 1.5 + 2 s and slack
    assert result.recovery_s <= 8.0, result.line()
    _assert_clean(result, f"kills={len(faults)} restarts={cluster.restarts}")


def _count_log(cluster: Cluster, prefix: str, event: str) -> int:
    return sum(1 for p in cluster.procs if p.name.startswith(prefix) for e in p.log_events() if e.get("event") == event)


async def test_kill_manager_three_times_under_load(cluster: Cluster) -> None:
    """T2: SIGKILL the manager at random points under load, restart it on the same ledger."""
    manager = cluster.manager()
    for i in range(3):
        cluster.supervised_worker(f"w{i}")
    n = 300
    run_id = await cluster.submit(cluster.write_job("kill-manager", effect_tasks(n, sleep=0.1)))
    rng = random.Random(2)
    faults: list[tuple[float, int | None]] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(cluster.supervise)
        for _ in range(3):
            # wait for progress, so every kill lands under load with results flowing
            before = await cluster.accepted_count(run_id)
            with anyio.fail_after(30):
                while await cluster.accepted_count(run_id) < before + rng.randint(10, 40):
                    await anyio.sleep(0.05)
            await anyio.sleep(rng.uniform(0.0, 0.3))
            faults.append((time.time(), None))
            manager.signal(signal.SIGKILL)
            manager.popen.wait(5)
            manager = cluster.manager()
        status = await cluster.wait(run_id, timeout=60)
        tg.cancel_scope.cancel()
    result = cluster.check(status, n, faults)
    # replies the dead manager had recorded (or only applied) but not acknowledged come back to its successor
    redelivered = _count_log(cluster, "manager", "duplicate_reply_ignored") + \
        _count_log(cluster, "manager", "stale_reply_ignored")
    print(f"manager kills={len(faults)} replies redelivered and ignored={redelivered}")
    _assert_clean(result)


async def test_kill_redis_with_aof_and_restart(cluster: Cluster) -> None:
    """T3: SIGKILL redis-server (appendonly yes, everysec) mid-run, restart on the same dir and port."""
    cluster.manager()
    for i in range(3):
        cluster.supervised_worker(f"w{i}")
    n = 300
    run_id = await cluster.submit(cluster.write_job("kill-redis", effect_tasks(n, sleep=0.1)))
    faults: list[tuple[float, int | None]] = []
    with anyio.fail_after(30):
        while await cluster.accepted_count(run_id) < 80:
            await anyio.sleep(0.05)
    faults.append((time.time(), None))
    cluster.redis.kill()
    await anyio.sleep(1.5)
    cluster.redis.start()
    status = await cluster.wait(run_id, timeout=60)
    result = cluster.check(status, n, faults)
    dead = [p.name for p in cluster.procs if not p.alive]
    _assert_clean(result, f"exited={dead}")
    assert not dead, f"processes exited instead of reconnecting: {dead}"


async def test_redis_restarts_empty(cluster: Cluster) -> None:
    """T4: Redis comes back empty on the same port: the manager re-drives the run from its ledger."""
    cluster.manager()
    for i in range(3):
        cluster.supervised_worker(f"w{i}")
    n = 300
    run_id = await cluster.submit(cluster.write_job("empty-redis", effect_tasks(n, sleep=0.1)))
    faults: list[tuple[float, int | None]] = []
    with anyio.fail_after(30):
        while await cluster.accepted_count(run_id) < 80:
            await anyio.sleep(0.05)
    faults.append((time.time(), None))
    cluster.redis.kill()
    cluster.redis.dir = cluster.tmp / "redis-empty"  # a fresh, empty data dir
    cluster.redis.start()
    status = await cluster.wait(run_id, timeout=60)
    result = cluster.check(status, n, faults)
    dead = [p.name for p in cluster.procs if not p.alive]
    _assert_clean(result, f"exited={dead}")
    assert not dead, f"processes exited instead of reconnecting: {dead}"
