"""Fuzz: 10,000 hostile frames on every stream the manager consumes; none stops it, each is dead-lettered.

Random bytes and msgpack-level mutations of valid signed frames (flipped bytes, truncations, changed
types, dropped and unknown keys, deepened values, wrong headers, oversized frames; changed after
signing, or before by a key holder), unsigned, forged and wrongly signed frames, from a seed
(``ORCH_FUZZ_SEED``; ``ORCH_FUZZ_FRAMES`` per stream, 10,000 by default). Frames are published
with pipelined redis-py to the jobs, overrides and two results streams of a real manager process.
The manager must dead-letter every one with its reason, keep nothing pending, and still finish a
run afterwards.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from collections import Counter
from typing import Any

import anyio
import pytest
import redis

from protocol.codec import Codec
from protocol.keyring import Keyring
from tests.integration.harness import Cluster
from tests.security.attacker import add, assigns, dead_key, signed, stream_key
from tests.security.frames import hostile_frames

pytestmark = [pytest.mark.redis, pytest.mark.timeout(300)]

FRAMES = int(os.environ.get("ORCH_FUZZ_FRAMES", "10000"))
SEED = int(os.environ.get("ORCH_FUZZ_SEED", "20261202"))
CAPABILITIES = ("x", "y")  # capabilities of the session keyring: the generator signs with their worker keys
STREAMS = ("jobs", "overrides", *(f"results.{c}" for c in CAPABILITIES))


async def _assigns_for(r: redis.Redis, run_id: str) -> dict[str, dict[str, Any]]:
    """The first assign of each capability of the run, once every capability has one."""
    with anyio.fail_after(30):
        while True:
            found = {c: a for c in CAPABILITIES for a in assigns(r, c) if a["run_id"] == run_id}
            if len(found) == len(CAPABILITIES):
                return found
            await anyio.sleep(0.1)


def _publish(r: redis.Redis, stream: str, frames: list[bytes]) -> None:
    key = stream_key(stream)
    for start in range(0, len(frames), 500):
        pipe = r.pipeline(transaction=False)
        for frame in frames[start:start + 500]:
            pipe.xadd(key, {"f": frame})
        pipe.execute()


async def test_every_hostile_frame_is_dead_lettered_with_a_reason_and_the_manager_goes_on(
        cluster: Cluster, attacker: redis.Redis) -> None:
    print(f"fuzz seed {SEED}, {FRAMES} frames per stream")
    manager = cluster.manager()
    # A run with a task per capability, so the manager reads both results streams; no worker serves them.
    run_id = uuid.uuid4().hex
    job = {"goal": "fuzz", "tasks": [{"id": c, "capability": c} for c in CAPABILITIES]}
    add(attacker, "jobs", signed({"type": "submit", "job": job}, "operator:tests", run_id=run_id))
    waiting = await _assigns_for(attacker, run_id)

    started = time.monotonic()
    rng = random.Random(SEED)
    verifying = Codec(keyring=Keyring.load(os.environ["ORCH_KEYS"]))  # what the manager checks, with no key to sign
    sent: dict[str, list[bytes]] = {}
    for stream in STREAMS:  # each stream published as soon as made: the manager works while the next is made
        sent[stream], made = hostile_frames(stream, FRAMES, rng, verifying)
        _publish(attacker, stream, sent[stream])
        print(stream, dict(sorted(made.items())))
    published = time.monotonic()

    with anyio.fail_after(240):
        while True:
            counts = {s: attacker.xlen(dead_key(s)) for s in STREAMS}
            if all(n >= FRAMES for n in counts.values()) or not manager.alive:
                break
            await anyio.sleep(0.5)
    drained = time.monotonic()
    print(f"generated and published in {published - started:.1f} s, all dead-lettered {drained - published:.1f} s "
          "later")
    assert manager.alive, f"the manager died; log: {manager.log}"
    for stream in STREAMS:
        entries: Any = attacker.xrange(dead_key(stream))
        reasons = [fields[b"reason"].decode() for _, fields in entries]
        assert len(entries) == FRAMES, stream  # every frame, once
        assert Counter(fields[b"f"] for _, fields in entries) == Counter(sent[stream]), stream
        assert all(r.startswith("undecodable frame: ") and len(r) > len("undecodable frame: ") for r in reasons)
        pending: Any = attacker.xpending(stream_key(stream), "manager")
        assert pending["pending"] == 0, stream
        print(stream, Counter(r.split(":")[1].strip().split(" ")[0] for r in reasons).most_common(6))

    # Still working: the run the storm hit finishes when its tasks are answered.
    for capability, assign in waiting.items():
        add(attacker, f"results.{capability}", signed({"type": "done", "output": capability}, f"worker:{capability}",
                                                      run_id=run_id, task_id=assign["task_id"],
                                                      attempt=assign["attempt"]))
    final = await cluster.wait(run_id, timeout=30)
    assert final["state"] == "accepted"
    assert manager.alive
