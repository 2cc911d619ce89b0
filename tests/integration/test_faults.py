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
    n = 600  # about 10 s of work for 3 workers x 4: room for the three kills the test needs
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
    n = 600  # long enough that three kills land before the run ends (workers work on while a manager is down)
    run_id = await cluster.submit(cluster.write_job("kill-manager", effect_tasks(n, sleep=0.1)))
    rng = random.Random(2)
    faults: list[tuple[float, int | None]] = []
    async with anyio.create_task_group() as tg:
        tg.start_soon(cluster.supervise)
        for _ in range(3):
            # wait for progress, so every kill lands under load with results flowing
            if not await cluster.until_accepted(run_id, await cluster.accepted_count(run_id) + rng.randint(10, 40)):
                break  # the run ended while the last manager was down: nothing is left to kill under load
            await anyio.sleep(rng.uniform(0.0, 0.3))
            faults.append((time.time(), None))
            manager.signal(signal.SIGKILL)
            manager.popen.wait(5)
            manager = cluster.manager()
        status = await cluster.wait(run_id, timeout=60)
        tg.cancel_scope.cancel()
    result = cluster.check(status, n, faults)
    # replies the dead manager had not acknowledged come back to its successor (as do replies to re-sent assigns)
    redelivered = _count_log(cluster, "manager", "input_ignored")
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
    await cluster.until_accepted(run_id, 80)
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
    await cluster.until_accepted(run_id, 80)
    faults.append((time.time(), None))
    cluster.redis.kill()
    cluster.redis.dir = cluster.tmp / "redis-empty"  # a fresh, empty data dir
    cluster.redis.start()
    status = await cluster.wait(run_id, timeout=60)
    result = cluster.check(status, n, faults)
    dead = [p.name for p in cluster.procs if not p.alive]
    _assert_clean(result, f"exited={dead}")
    assert not dead, f"processes exited instead of reconnecting: {dead}"


async def test_zombie_worker_commit_is_refused(cluster: Cluster) -> None:
    """T5: a worker SIGSTOPped past its lease while holding a task; after SIGCONT its late commit is refused."""
    cluster.manager()
    workers = [cluster.worker(concurrency=1), cluster.worker(concurrency=1)]
    run_id = await cluster.submit(cluster.write_job("zombie", effect_tasks(1, prefix="z", sleep=1.5)))
    with anyio.fail_after(20):
        while not (rows := cluster.executions(run_id)):
            await anyio.sleep(0.02)
    zombie = next(w for w in workers if w.pid == rows[0][2])
    fault = time.time()
    zombie.signal(signal.SIGSTOP)
    status = await cluster.wait(run_id, timeout=20)  # the other worker reclaims it after the lease (1 s)
    await anyio.sleep(max(0.0, fault + 4.0 - time.time()))  # paused for 4 leases in all
    zombie.signal(signal.SIGCONT)
    with anyio.fail_after(10):
        while not any(e.get("event") == "commit_refused" for e in zombie.log_events()):
            await anyio.sleep(0.05)
    result = cluster.check(status, 1, [(fault, None)])
    executions = cluster.executions(run_id)
    print(f"zombie: executions={len(executions)} pids={sorted({r[2] for r in executions})}")
    _assert_clean(result)
    assert len(executions) == 2, executions  # re-executed once, the effect applied once (checked above)
    assert status["tasks"][0]["worker"] != zombie.name


async def test_poison_tasks_and_garbage_frames(cluster: Cluster) -> None:
    """T7: a task that always raises fails with its error; one that kills its worker and a garbage frame are
    dead-lettered with a reason; the workers stay up (restarted when they die) and the other tasks finish."""
    cluster.manager()
    for i in range(3):
        cluster.supervised_worker(f"w{i}", concurrency=2)
    good = effect_tasks(60, sleep=0.02)
    raising = [{"id": "boom", "capability": "effect", "input": {"raise": True}, "max_attempts": 2},
               *effect_tasks(5, prefix="ok")]
    crashing = [{"id": "crash", "capability": "effect", "input": {"exit": True}}]
    async with anyio.create_task_group() as tg:
        tg.start_soon(cluster.supervise)
        async with cluster.bus() as bus:
            crash_run = await cluster.submit(cluster.write_job("crash", crashing))
            await bus._redis.xadd(bus.key("tasks.effect"), {b"f": b"\x00\xffnot an envelope"})
            good_run = await cluster.submit(cluster.write_job("good", good))
            raise_run = await cluster.submit(cluster.write_job("raise", raising))
            good_status = await cluster.wait(good_run, timeout=40)
            raise_status = await cluster.wait(raise_run, timeout=40)
            with anyio.fail_after(40):
                while len(dead := await bus.dead_letters("tasks.effect")) < 2:
                    await anyio.sleep(0.2)
            crash_status = await cluster.wait(crash_run, timeout=20)  # the manager fails it, not its deadline
        tg.cancel_scope.cancel()
    result = cluster.check(good_status, len(good))
    _assert_clean(result)
    boom = next(t for t in raise_status["tasks"] if t["id"] == "boom")
    assert raise_status["state"] == "failed"
    assert boom["state"] == "failed"
    assert boom["attempts"] == 2
    assert "poison task boom always raises" in boom["reason"]
    assert all(t["state"] == "accepted" for t in raise_status["tasks"] if t["id"] != "boom")
    by_reason = {d.reason: d for d in dead}
    print(f"dead letters: {[(d.reason, d.deliveries) for d in dead]}; worker restarts={cluster.restarts}")
    garbage = [d for d in dead if d.reason.startswith("undecodable frame")]
    crashed = [d for d in dead if not d.reason.startswith("undecodable frame")]
    assert len(garbage) == 1, by_reason
    assert garbage[0].frame == b"\x00\xffnot an envelope"
    assert len(crashed) == 1, by_reason
    assert b"crash" in crashed[0].frame
    assert crashed[0].deliveries == 5  # max_deliveries, then never delivered again
    assert cluster.restarts == 5  # each delivery of the crasher killed one worker, and only that did
    assert all(p.alive for p in cluster.slots.values())
    crash = crash_status["tasks"][0]
    assert (crash_status["state"], crash["state"]) == ("failed", "failed")
    assert crash["reason"].startswith("dead-lettered by the bus: delivered 5 times"), crash["reason"]


async def test_sigterm_half_the_workers_hands_work_back(cluster: Cluster) -> None:
    """T8: SIGTERM half the workers under load: in-flight work finishes or is handed back at once.

    The lease is 30 s, so the run finishing in a fraction of that proves the hand-back."""
    cluster.manager()
    workers = [cluster.worker(concurrency=4, lease_s=30.0, drain_s=0.3) for _ in range(4)]
    n = 200
    started = time.monotonic()
    run_id = await cluster.submit(cluster.write_job("sigterm", effect_tasks(n, sleep=0.5)))
    await cluster.until_accepted(run_id, 40)
    fault = time.time()
    for w in workers[:2]:
        w.signal(signal.SIGTERM)
    status = await cluster.wait(run_id, timeout=60)
    elapsed = time.monotonic() - started
    result = cluster.check(status, n, [(fault, None)])
    handed_back = _count_log(cluster, "worker", "task_handed_back")
    codes = [w.popen.wait(10) for w in workers[:2]]
    print(f"sigterm: run took {elapsed:.1f}s with lease 30s; handed back={handed_back}; exit codes={codes}")
    _assert_clean(result)
    assert codes == [0, 0]
    assert result.recovery_s < 5.0, f"released work waited for the lease: {result.line()}"
    assert elapsed < 25.0, f"released work waited for the lease: {result.line()}"


async def test_standby_manager_takes_over(cluster: Cluster) -> None:
    """A standby manager on the same ledger and Redis takes over within ~2 lease periods of a kill -9."""
    leader = cluster.manager("leader")
    with anyio.fail_after(20):
        while not any(e.get("event") == "manager_ready" for e in leader.log_events()):
            await anyio.sleep(0.05)
    standby = cluster.manager("standby")
    for i in range(3):
        cluster.supervised_worker(f"w{i}")
    n = 200
    run_id = await cluster.submit(cluster.write_job("standby", effect_tasks(n, sleep=0.1)))
    await cluster.until_accepted(run_id, 60)
    assert any(e.get("event") == "standing_by" for e in standby.log_events())
    fault = time.time()
    leader.signal(signal.SIGKILL)
    status = await cluster.wait(run_id, timeout=60)
    ready = next(e for e in standby.log_events() if e.get("event") == "manager_ready")
    from datetime import datetime

    takeover = datetime.fromisoformat(ready["timestamp"]).timestamp() - fault
    result = cluster.check(status, n, [(fault, None)])
    print(f"standby took over {takeover:.2f}s after the leader was killed (manager lease 1 s)")
    _assert_clean(result)
    assert takeover <= 2 * cluster.manager_lease_s + 0.5


async def test_cli_submit_wait_json_and_status_from_another_process(cluster: Cluster) -> None:
    """``orchestrator submit --wait --json`` and ``orchestrator status --json``, each a separate process."""
    import json
    import os
    import sys

    from tests.integration.harness import ROOT

    cluster.manager()
    cluster.worker()
    job = cluster.write_job("cli", effect_tasks(10))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ORCH_REDIS_URL": cluster.url}
    cli = [sys.executable, "-m", "orchestrator.cli"]
    done = await anyio.run_process([*cli, "submit", str(job), "--wait", "--json"], cwd=ROOT, env=env, check=False)
    assert done.returncode == 0, done.stderr.decode()
    result = json.loads(done.stdout)
    assert {"run_id", "state", "tasks"} <= result.keys()
    assert result["state"] == "accepted"
    assert [t["id"] for t in result["tasks"]] == [f"t{i:03d}" for i in range(10)]
    shown = await anyio.run_process([*cli, "status", result["run_id"], "--json"], cwd=ROOT, env=env, check=False)
    assert shown.returncode == 0, shown.stderr.decode()
    status = json.loads(shown.stdout)
    assert {"run_id", "goal", "state", "reason", "tokens", "tasks"} <= status.keys()
    assert status["run_id"] == result["run_id"]
    assert status["state"] == "accepted"
    for t in status["tasks"]:
        assert {"id", "capability", "state", "attempts", "output", "reason", "worker"} <= t.keys()
        assert (t["state"], t["output"], t["capability"]) == ("accepted", t["id"], "effect")
    _assert_clean(cluster.check(status, 10))
    unknown = await anyio.run_process([*cli, "status", "nope", "--json"], cwd=ROOT, env=env, check=False)
    assert unknown.returncode == 2
