"""Redis outages with real processes: the manager and workers wait for Redis, unless ``--exit-after-s`` is given.

Each test owns a redis-server (AOF on) and ``orchestrator manager`` / ``worker`` subprocesses; see
tests/integration/harness.py. The outage in the first test (7 s) is far longer than the
``--exit-after-s 2`` that makes processes give up in the second, and than the manager's lease
(1 s): the processes live through it because nothing bounds how long they wait, not because
the outage was short.
"""

from __future__ import annotations

import signal
import time
from datetime import datetime
from typing import Any

import anyio
import pytest

from tests.integration.harness import Cluster, Proc, effect_tasks

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(60)]

OUTAGE_S = 7.0


def _stamp(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def _events(proc: Proc, name: str) -> list[dict[str, Any]]:
    return [e for e in proc.log_events() if e.get("event") == name]


async def test_manager_and_workers_wait_out_a_long_outage_and_the_run_completes(cluster: Cluster) -> None:
    manager = cluster.manager()  # no --exit-after-s: wait for Redis however long it takes
    workers = [cluster.worker(f"w{i}") for i in range(2)]
    n = 100
    run_id = await cluster.submit(cluster.write_job("outage", effect_tasks(n, sleep=0.2)))
    await cluster.until_accepted(run_id, 10)
    fault = time.time()
    cluster.redis.kill()
    await anyio.sleep(OUTAGE_S)
    dead = [p.name for p in cluster.procs if not p.alive]
    assert not dead, f"processes gave up during the outage: {dead}"
    restarted = time.time()
    cluster.redis.start()  # same port and dir: the AOF brings the streams, groups and pending entries back
    status = await cluster.wait(run_id, timeout=40)
    result = cluster.check(status, n, [(fault, None)])
    print(f"outage: {OUTAGE_S:g}s without Redis, no process exited")
    assert result.passed, result.line()
    assert status["state"] == "accepted"
    dead = [p.name for p in cluster.procs if not p.alive]
    assert not dead, f"processes exited instead of reconnecting: {dead}"
    for proc in (manager, *workers):
        # each process measured one continuous outage of about OUTAGE_S, logged it, and came through it
        assert _events(proc, "redis_unreachable"), proc.name
        back = _events(proc, "redis_reachable_again")
        assert back, proc.name
        assert max(e["outage_s"] for e in back) >= OUTAGE_S - 1.5, (proc.name, back)
    # The manager could not renew its 1 s lease, so it stepped down early in the outage and stood by, retrying
    # to take the lease through the rest of it (which used to exit the process), and led again under epoch 2.
    [stepped_down] = _events(manager, "leadership_lost_standing_by")
    assert _stamp(stepped_down) < restarted - (OUTAGE_S - 3.0), "the manager stepped down only once Redis was back"
    assert "could not renew" in stepped_down["error"]
    assert [e["epoch"] for e in _events(manager, "leadership_acquired")] == [1, 2]


async def test_exit_after_s_ends_a_process_with_a_message_and_sigterm_still_stops_one_that_waits(
        cluster: Cluster) -> None:
    manager = cluster.manager(exit_after_s=2)
    quitter = cluster.worker("quitter", exit_after_s=2)
    waiter = cluster.worker("waiter", drain_s=0.5)  # no limit: it would wait for Redis forever
    run_id = await cluster.submit(cluster.write_job("give-up", effect_tasks(200, sleep=1.0)))
    await cluster.until_accepted(run_id, 8)  # both workers hold tasks when Redis dies
    killed = time.monotonic()
    cluster.redis.kill()
    with anyio.fail_after(15):
        while quitter.alive or manager.alive:
            await anyio.sleep(0.05)
    gone_after = time.monotonic() - killed
    assert (quitter.popen.returncode, manager.popen.returncode) == (1, 1)
    assert gone_after >= 2.0, f"gave up {gone_after:.1f}s into the outage, before --exit-after-s 2"
    for proc in (quitter, manager):
        text = proc.log.read_text()
        assert "orchestrator: error: cannot reach Redis at 'redis://127.0.0.1:" in text, text[-2000:]
        assert "past the limit of 2s" in text, text[-2000:]
        assert _events(proc, "redis_outage_limit_reached"), proc.name
    assert waiter.alive, "a worker without --exit-after-s gave up"
    # SIGTERM during the outage: the waiter stops at once rather than waiting for Redis to hand its tasks back
    stopped = time.monotonic()
    waiter.signal(signal.SIGTERM)
    code = await anyio.to_thread.run_sync(waiter.popen.wait, 20)
    took = time.monotonic() - stopped
    print(f"outage: --exit-after-s 2 processes exited 1 after {gone_after:.1f}s; SIGTERM stopped the waiting "
          f"worker in {took:.1f}s")
    assert code == 0
    assert took < 0.5 + cluster.lease_s + 5.0  # drain_s + one lease + process exit
