"""Staged jobs changed in Redis: the manager reads them as hostile and refuses them by name.

A job too big for one bus message waits as a plain value (``orch:value:job.<run id>``) that anyone who can
write to Redis can change; only its submission is signed, with the value's size and digest. Here the values
of queued submissions are changed with raw redis-py before a real manager process takes them.
"""

from __future__ import annotations

import pytest
import redis

from tests.integration.harness import Cluster, effect_tasks
from tests.security.attacker import NS

pytestmark = [pytest.mark.redis, pytest.mark.timeout(180)]

PADDING = "p" * 1_500  # 200 tasks of it: ~300 KB, over what travels in a submission


def staged_key(run_id: str) -> str:
    return f"{NS}:value:job.{run_id}"


async def test_changed_grown_and_deleted_staged_jobs_fail_their_runs_naming_why(
        cluster: Cluster, attacker: redis.Redis) -> None:
    runs = {}
    for name in ("changed", "grown", "deleted", "untouched"):
        path = cluster.write_job(name, effect_tasks(200, prefix=f"{name}-", padding=PADDING))
        runs[name] = await cluster.submit(path)  # no manager yet: each waits in the jobs stream
    staged = {name: attacker.get(staged_key(run_id)) for name, run_id in runs.items()}
    assert all(value and len(value) > 256 * 1024 for value in staged.values())

    changed = staged["changed"]
    assert changed is not None
    attacker.set(staged_key(runs["changed"]), changed.replace(b"fault test changed", b"fault test CHANGED"))
    attacker.set(staged_key(runs["grown"]), b"\x00" * (50 * 1024 * 1024))  # refused before it is read
    attacker.delete(staged_key(runs["deleted"]))

    manager = cluster.manager()
    cluster.worker(concurrency=16)
    reasons = {name: (await cluster.wait(run_id))["reason"] for name, run_id in runs.items() if name != "untouched"}
    assert "does not match the size and digest its signed submission names" in reasons["changed"]
    assert "longer than the" in reasons["grown"]
    assert "is gone" in reasons["deleted"]
    untouched = await cluster.wait(runs["untouched"], timeout=120)
    assert untouched["state"] == "accepted", untouched["reason"]
    assert manager.alive
    assert [attacker.exists(staged_key(run_id)) for run_id in runs.values()] == [0, 0, 0, 0]  # all freed
