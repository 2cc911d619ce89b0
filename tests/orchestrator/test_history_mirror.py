"""A run's history mirrored on the bus for followers on other machines: only while someone follows it (or for
every run with ``mirror="all"``), from the ledger for what came before, kept a while after the run's last event."""

from __future__ import annotations

import json
import subprocess
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.asyncio as aioredis

from orchestrator import processes
from orchestrator.acknowledger import Mirror
from orchestrator.api import Orchestrator
from orchestrator.ledger import SQLiteStore
from orchestrator.manager import ManagerSettings
from orchestrator.records import events_envelope
from protocol.errors import NoActiveManager
from protocol.history import RunFinished
from protocol.keys import events_stream
from protocol.redis_bus import RedisBus
from tests._trust import env_without_orch
from tests.test_cli_contract import COMMAND, ROOT
from workers import Task, Worker

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]


class Echo(Worker):
    capability = "echo"

    async def handle(self, task: Task) -> Any:
        return task.input


@pytest.mark.parametrize("mirror", ["all", "followed"])
async def test_a_finished_runs_history_on_redis_expires_snapshot_ttl_s_after_its_end(redis_url: str,
                                                                                    mirror: Mirror) -> None:
    bus = RedisBus.from_url(redis_url, namespace=f"mirror-{uuid.uuid4().hex[:8]}")
    async with Orchestrator(bus=bus, workers=[Echo], insecure=True,
                            manager_settings=ManagerSettings(snapshot_ttl_s=600, mirror=mirror)) as orch:
        run = await orch.submit({"goal": "g", "tasks": [{"id": "t", "capability": "echo", "input": 1}]})
        assert (await run.wait()).accepted
        with anyio.fail_after(10):  # mirrored after the commit that made the end durable: followed until then
            events = [event async for event in processes.follow_events(bus, run.run_id, poll_s=0.1)]
        raw = aioredis.Redis.from_url(redis_url)
        try:
            ttl = await raw.ttl(bus.key(events_stream(run.run_id)))
        finally:
            await raw.aclose()
    assert [e.seq for e in events] == list(range(1, len(events) + 1))  # the whole history, in order
    assert isinstance(events[-1].body, RunFinished)
    assert 590 <= ttl <= 600, ttl


async def test_followers_read_an_event_the_manager_sent_twice_once(redis_url: str) -> None:
    # A mirror send cut short as the manager stops goes again at its last commit: it may have been out already.
    ns = uuid.uuid4().hex[:8]
    async with Orchestrator(bus=RedisBus.from_url(redis_url, namespace=f"mirror-{ns}"), workers=[Echo],
                            insecure=True) as orch:
        run = await orch.submit({"goal": "g", "tasks": [{"id": f"t{i}", "capability": "echo", "input": i}
                                                        for i in range(3)]})
        assert (await run.wait()).accepted
        history = [event async for event in run.events()]
    assert len(history) >= 8
    async with RedisBus.from_url(redis_url, namespace=f"again-{ns}") as bus:
        for chunk in (history[:4], history[2:5], history[4:5], history[3:]):  # overlapping resends
            await bus.publish(events_stream(run.run_id), events_envelope(run.run_id, chunk, "manager"))
        read = await processes.read_events(bus, run.run_id)
        with anyio.fail_after(10):
            followed = [event async for event in processes.follow_events(bus, run.run_id, poll_s=0.1)]
    assert [e.seq for e in read] == [e.seq for e in followed] == [e.seq for e in history]


class Gated(Worker):
    """Answers task ``i`` once ``i`` is below ``open_to``: the test lets the run go on a step at a time."""

    capability = "gated"
    open_to = 0
    changed: anyio.Event

    async def handle(self, task: Task) -> Any:
        while task.input >= Gated.open_to:
            await Gated.changed.wait()
        return task.input

    @classmethod
    def open(cls, to: int) -> None:
        cls.open_to = to
        cls.changed.set()
        cls.changed = anyio.Event()


def _chain(n: int) -> dict[str, Any]:
    return {"goal": "a chain", "tasks": [{"id": f"t{i}", "capability": "gated", "input": i,
                                          **({"depends_on": [f"t{i - 1}"]} if i else {})} for i in range(n)]}


async def _stream_seqs(redis_url: str, bus: RedisBus, run_id: str) -> list[int]:
    """Every seq on the run's history stream, duplicates included, read with plain redis-py."""
    async with RedisBus.from_url(redis_url, namespace=bus.redis_settings.namespace) as reader:
        return [e.seq for _, env in await reader.read(events_stream(run_id), count=100_000)
                for e in env.body.events]  # type: ignore[union-attr]


async def test_a_run_nobody_follows_is_not_mirrored_and_a_later_reader_gets_it_from_the_ledger(redis_url: str) -> None:
    bus = RedisBus.from_url(redis_url, namespace=f"mirror-{uuid.uuid4().hex[:8]}")
    raw = aioredis.Redis.from_url(redis_url)
    try:
        async with Orchestrator(bus=bus, workers=[Echo], insecure=True) as orch:
            runs = [await orch.submit({"goal": "g", "tasks": [{"id": "t", "capability": "echo", "input": i}]})
                    for i in range(3)]
            for run in runs:
                assert (await run.wait()).accepted
            await anyio.sleep(0.6)  # a few of the manager's looks for followers and commits
            assert not await raw.exists(*(bus.key(events_stream(run.run_id)) for run in runs))
            read = await processes.read_events(bus, runs[1].run_id)  # asks, and waits for the manager to send it
            stored = await orch.store.events(runs[1].run_id)
            assert not await raw.exists(bus.key(events_stream(runs[0].run_id)))  # only the run asked for
    finally:
        await raw.aclose()
    assert read == stored
    assert isinstance(read[-1].body, RunFinished)


async def test_a_follower_mid_run_gets_the_history_so_far_then_each_event_once_in_order(redis_url: str) -> None:
    Gated.open_to, Gated.changed = 0, anyio.Event()
    bus = RedisBus.from_url(redis_url, namespace=f"mirror-{uuid.uuid4().hex[:8]}")
    async with Orchestrator(bus=bus, workers=[Gated], insecure=True) as orch:
        run = await orch.submit(_chain(4))
        Gated.open(2)  # two tasks end before anyone follows
        with anyio.fail_after(10):
            async for event in run.events():
                if event.task_id == "t2" and event.body.kind == "dispatched":
                    break
        seen: list[int] = []
        with anyio.fail_after(20):
            async for event in processes.follow_events(bus, run.run_id, poll_s=0.1):
                seen.append(event.seq)
                if len(seen) == 3:
                    Gated.open(4)  # the rest happens while followed
        assert (await run.wait()).accepted
        stored = [e.seq for e in await orch.store.events(run.run_id)]
    assert seen == stored
    on_the_stream = await _stream_seqs(redis_url, bus, run.run_id)
    assert sorted(on_the_stream) == stored  # each event sent once: the history so far, then the rest


async def test_a_lapsed_follow_stops_the_mirror_and_the_next_follower_gets_only_what_it_lacks(redis_url: str) -> None:
    Gated.open_to, Gated.changed = 0, anyio.Event()
    bus = RedisBus.from_url(redis_url, namespace=f"mirror-{uuid.uuid4().hex[:8]}")
    async with Orchestrator(bus=bus, workers=[Gated], insecure=True,
                            manager_settings=ManagerSettings(follows_poll_s=0.05)) as orch:
        run = await orch.submit(_chain(3))
        Gated.open(1)
        with anyio.fail_after(10):
            async for event in run.events():
                if event.task_id == "t1" and event.body.kind == "dispatched":
                    break
        await bus.follow(run.run_id, after_seq=0, ttl_s=0.5)  # a follower that does not come back
        with anyio.fail_after(10):
            while True:
                if first := await _stream_seqs(redis_url, bus, run.run_id):
                    break
                await anyio.sleep(0.05)
        await anyio.sleep(0.8)  # lapsed
        Gated.open(3)
        assert (await run.wait()).accepted
        await anyio.sleep(0.3)
        assert await _stream_seqs(redis_url, bus, run.run_id) == first  # nothing mirrored past the lapse
        read = await processes.read_events(bus, run.run_id)
        stored = [e.seq for e in await orch.store.events(run.run_id)]
    assert [e.seq for e in read] == stored
    assert sorted(await _stream_seqs(redis_url, bus, run.run_id)) == stored  # the gap, not the whole history again


async def test_with_the_mirror_off_a_reader_is_told_no_manager_sends_the_history(redis_url: str) -> None:
    bus = RedisBus.from_url(redis_url, namespace=f"mirror-{uuid.uuid4().hex[:8]}")
    async with Orchestrator(bus=bus, workers=[Echo], insecure=True,
                            manager_settings=ManagerSettings(mirror="off")) as orch:
        run = await orch.submit({"goal": "g", "tasks": [{"id": "t", "capability": "echo", "input": 1}]})
        assert (await run.wait()).accepted
        with pytest.raises(NoActiveManager, match=f"run '{run.run_id}' has [0-9]+ history entries and the bus has 0: no manager sent the rest"):
            await processes.read_events(bus, run.run_id, wait_s=0.5)


def test_events_says_so_and_exits_1_when_no_manager_sends_the_history_and_reads_it_from_the_ledger(
        redis_url: str, tmp_path: Path) -> None:
    namespace = f"mirror-{uuid.uuid4().hex[:8]}"
    ledger = tmp_path / "ledger.db"

    async def one_run_then_stop() -> str:
        async with Orchestrator(bus=RedisBus.from_url(redis_url, namespace=namespace), workers=[Echo],
                                store=SQLiteStore(ledger), insecure=True) as orch:
            run = await orch.submit({"goal": "g", "tasks": [{"id": "t", "capability": "echo", "input": 1}]})
            assert (await run.wait()).accepted
            await anyio.sleep(0.6)  # its final summary is out
            return run.run_id

    run_id = anyio.run(one_run_then_stop)  # the manager is gone: nobody followed the run, nobody sends it now
    env = {**env_without_orch(keep_keyring=False), "PYTHONPATH": str(ROOT)}
    args = [*COMMAND, "events", run_id, "--redis", redis_url, "--namespace", namespace, "--insecure", "--wait-s", "1"]
    text = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    as_json = subprocess.run([*args, "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert text.returncode == as_json.returncode == 1
    assert f"run '{run_id}' has" in text.stderr
    assert "no manager sent the rest within 1 s" in text.stderr
    assert json.loads(as_json.stdout)["error_type"] == "NoActiveManager"
    assert "--ledger PATH" in text.stderr

    # From the ledger: no Redis needed, read-only.
    local = [*COMMAND, "events", run_id, "--ledger", str(ledger)]
    from_ledger = subprocess.run([*local, "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert from_ledger.returncode == 0, from_ledger.stderr
    events = [json.loads(line) for line in from_ledger.stdout.splitlines()]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["body"]["kind"] == "run_finished"
    unknown = subprocess.run([*COMMAND, "events", "nope", "--ledger", str(ledger)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2
    assert "not in the ledger" in unknown.stderr
    (tmp_path / "not-a-ledger").write_text("hello")
    bad = subprocess.run([*COMMAND, "events", run_id, "--ledger", str(tmp_path / "not-a-ledger")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert "--ledger" in bad.stderr
    assert "Traceback" not in bad.stderr
