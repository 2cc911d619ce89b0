"""Data no manager can store or walk: refused the first time it is seen, and the manager keeps running.

Before, a ``done`` with a ~300-level nested output crashed the manager in its ledger, and again on
every restart, until the fifth redelivery dead-lettered it.
"""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import pytest
import redis

from tests.integration.harness import Cluster
from tests.security.attacker import add, assigns, dead_letters, envelope, nested, pack, sign, signed

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]

CAP = "x"  # a capability of the session keyring: the attacker holds its worker key (a compromised worker)
WORKER = f"worker:{CAP}"
RESULTS = f"results.{CAP}"


async def _assign_of(r: redis.Redis, run_id: str) -> dict[str, Any]:
    with anyio.fail_after(20):
        while True:
            found = [a for a in assigns(r, CAP) if a["run_id"] == run_id]
            if found:
                return found[-1]
            await anyio.sleep(0.05)


def _submit(r: redis.Redis, max_attempts: int) -> str:
    run_id = uuid.uuid4().hex
    job = {"goal": "deep", "tasks": [{"id": "x", "capability": CAP, "max_attempts": max_attempts}]}
    add(r, "jobs", signed({"type": "submit", "job": job}, "operator:tests", run_id=run_id))
    return run_id


async def test_a_300_level_output_fails_its_attempt_once_and_the_manager_keeps_running(
        cluster: Cluster, attacker: redis.Redis) -> None:
    manager = cluster.manager()
    run_id = _submit(attacker, max_attempts=2)
    first = await _assign_of(attacker, run_id)
    add(attacker, RESULTS, signed({"type": "done", "output": nested(300)}, WORKER, run_id=run_id, task_id="x",
                                       attempt=first["attempt"]))
    with anyio.fail_after(20):  # the failed attempt is followed by a second one, at once
        while True:
            second = await _assign_of(attacker, run_id)
            if second["attempt"] != first["attempt"]:
                break
            await anyio.sleep(0.05)
    status = await cluster.status(run_id)
    assert status is not None
    assert status["state"] == "running"
    add(attacker, RESULTS, signed({"type": "done", "output": nested(300)}, WORKER, run_id=run_id, task_id="x",
                                       attempt=second["attempt"]))
    final = await cluster.wait(run_id, timeout=30)
    assert final["state"] == "failed"
    assert "output rejected: the output nests deeper than 64 levels (limit max_depth)" in final["reason"]
    assert dead_letters(attacker, RESULTS) == []  # failed as attempts, not redelivered into the bin
    assert manager.alive
    events = [e.get("event") for e in manager.log_events()]
    assert "reply_processing_failed" not in events

    # A restart finds nothing to choke on, and the manager still runs jobs.
    manager.kill()
    manager = cluster.manager()
    run_id = _submit(attacker, max_attempts=1)
    a = await _assign_of(attacker, run_id)
    add(attacker, RESULTS, signed({"type": "done", "output": {"fine": [1, 2]}}, WORKER, run_id=run_id, task_id="x",
                                       attempt=a["attempt"]))
    assert (await cluster.wait(run_id, timeout=30))["state"] == "accepted"
    assert manager.alive


async def test_frames_past_the_frame_limits_are_dead_lettered_with_the_reason(cluster: Cluster,
                                                                              attacker: redis.Redis) -> None:
    manager = cluster.manager()
    run_id = _submit(attacker, max_attempts=1)
    a = await _assign_of(attacker, run_id)
    # Spliced in as raw bytes: msgpack's own packer stops at 511 levels, a hostile one does not.
    # The markers are long enough not to turn up by chance in a frame's random bytes (its signature, its id):
    # a one-letter one did, once in a few hundred runs, and the splice broke the frame instead of nesting it.
    marker = "@deep-output-marker@"
    too_deep = _splice(signed({"type": "done", "output": marker}, WORKER, run_id=run_id, task_id="x",
                              attempt=a["attempt"]), marker, b"\x91" * 600 + b"\x01")
    add(attacker, RESULTS, too_deep)
    goal = "@deep-goal-marker@"
    add(attacker, "jobs", _splice(pack(sign(envelope({"type": "submit", "job": {"goal": goal}}), "operator:tests")),
                                  goal, b"\x91" * 700 + b"\x01"))
    with anyio.fail_after(20):
        while True:
            if len(dead_letters(attacker, RESULTS)) + len(dead_letters(attacker, "jobs")) == 2:
                break
            await anyio.sleep(0.05)
    [dead] = dead_letters(attacker, RESULTS)
    assert dead["f"] == too_deep
    assert dead["reason"].decode() == "undecodable frame: frame nests deeper than 512 levels (limit max_depth)"
    assert b"nests deeper than 512 levels" in dead_letters(attacker, "jobs")[0]["reason"]
    status = await cluster.status(run_id)
    assert status is not None
    assert status["state"] == "running"  # the attempt is still waiting for a real answer
    assert manager.alive


async def test_a_submission_too_deep_for_the_ledger_is_a_failed_run_not_a_crash(cluster: Cluster,
                                                                                 attacker: redis.Redis) -> None:
    manager = cluster.manager()
    run_id = uuid.uuid4().hex
    job = {"goal": "deep input", "tasks": [{"id": "x", "capability": CAP, "input": nested(300)}]}
    add(attacker, "jobs", signed({"type": "submit", "job": job}, "operator:tests", run_id=run_id))
    final = await cluster.wait(run_id, timeout=30)
    assert final["state"] == "failed"
    assert "invalid job: the job nests deeper than 68 levels (limit max_depth)" in final["reason"]
    assert manager.alive


def _splice(frame: bytes, marker: str, raw: bytes) -> bytes:
    """``frame`` with the packed ``marker`` replaced by ``raw`` bytes: what a hostile packer could send."""
    assert frame.count(pack(marker)) == 1, marker
    return frame.replace(pack(marker), raw)
