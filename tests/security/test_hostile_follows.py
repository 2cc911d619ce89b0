"""Follows written straight into Redis: the manager reads them as hostile, bounded, and keeps serving real ones.

Anyone who can write to Redis can add to ``orch:follows`` (docs/bus.md). Malformed entries are skipped, entries
claiming to live past the longest follow are deleted, and follows of runs the manager does not know cost it a
lookup each and nothing more.
"""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from orchestrator import processes
from tests.integration.harness import Cluster, effect_tasks
from tests.security.attacker import NS

pytestmark = [pytest.mark.redis, pytest.mark.timeout(120)]

FOLLOWS = f"{NS}:follows"


async def test_garbage_follows_are_dropped_and_a_real_follower_still_gets_the_history(
        cluster: Cluster, attacker: redis.Redis) -> None:
    manager = cluster.manager()
    cluster.worker()
    run_id = await cluster.submit(cluster.write_job("followed", effect_tasks(3)))
    assert (await cluster.wait(run_id))["state"] == "accepted"

    now_ms = int(time.time() * 1000)
    soon, forever = now_ms + 30_000, now_ms + 10**12
    garbage = {b"x" * 100_000: soon, b"no-seq-here": soon, b"-1:" + run_id.encode(): soon,
               b"99999999999999999999999999:" + run_id.encode(): soon, b"12:\xff\xfe": soon,
               b"0:" + b"y" * 10_000: soon, f"1:{run_id}".encode(): forever}
    garbage.update({f"0:{uuid.uuid4().hex}".encode(): soon for _ in range(800)})  # runs that do not exist
    attacker.zadd(FOLLOWS, garbage)  # type: ignore[arg-type]

    async with cluster.bus() as bus:
        events = await processes.read_events(bus, run_id)
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].body.kind == "run_finished"
    assert manager.alive
    # what claims to outlive any follow is gone; the huge and malformed ones lapse with their time
    assert attacker.zscore(FOLLOWS, f"1:{run_id}".encode()) is None
    assert attacker.zcount(FOLLOWS, f"({now_ms + 120_000}", "+inf") == 0
