"""Back-pressure of ``orchestrator manager``: ``--max-queue N`` bounds a capability's tasks in Redis,
``--dispatch-window N`` one run's tasks in flight."""

from __future__ import annotations

import anyio
import pytest

from tests.integration.harness import Cluster, effect_tasks

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(90)]


async def _run_slow_tasks(cluster: Cluster, n: int, *, manager_flags: list[str], concurrency: int) -> str:
    """A manager with ``manager_flags`` and one worker; submits ``n`` tasks of 0.15 s and returns the run id."""
    cluster.spawn("manager", ["manager", "--redis", cluster.url, "--ledger", str(cluster.ledger), "--lease-s", "5",
                               *manager_flags])
    cluster.worker(concurrency=concurrency)
    return await cluster.submit(cluster.write_job("slow", effect_tasks(n, sleep=0.15)))


async def test_dispatch_waits_while_a_capability_is_full(cluster: Cluster) -> None:
    n = 12
    run_id = await _run_slow_tasks(cluster, n, manager_flags=["--max-queue", "3"], concurrency=1)
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


async def test_the_dispatch_window_bounds_one_runs_tasks_in_flight(cluster: Cluster) -> None:
    n = 8
    run_id = await _run_slow_tasks(cluster, n, manager_flags=["--dispatch-window", "2"], concurrency=4)
    most_in_flight = most_held = 0
    with anyio.fail_after(60):
        while (status := await cluster.status(run_id)) is None or status["state"] == "running":
            if status is not None:
                in_flight = sum(t["attempts"] > 0 and t["state"] not in ("accepted", "failed", "cancelled")
                                for t in status["tasks"])
                most_in_flight, most_held = max(most_in_flight, in_flight), max(most_held, status["held"])
            await anyio.sleep(0.02)
    print(f"most in flight: {most_in_flight} (window 2), most held: {most_held}")
    assert status["state"] == "accepted"
    assert status["held"] == 0
    assert 1 <= most_in_flight <= 2
    assert most_held >= 1  # the worker could take 4 at once: the window, not the worker, held them
    assert cluster.check(status, n).passed


async def test_a_dispatch_window_under_one_task_is_refused_at_start(cluster: Cluster) -> None:
    proc = cluster.spawn("manager", ["manager", "--redis", cluster.url, "--ledger", str(cluster.ledger),
                                      "--dispatch-window", "0"])
    with anyio.fail_after(30):
        while proc.alive:
            await anyio.sleep(0.05)
    assert proc.popen.returncode == 2
    assert "--dispatch-window must be at least 1, got 0" in proc.log.read_text()
