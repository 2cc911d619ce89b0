"""The acknowledger's mirror of followed runs, driven directly: many runs followed at once."""

from __future__ import annotations

import time

import anyio
import pytest

from orchestrator.acknowledger import Acknowledger
from orchestrator.job import Job
from orchestrator.records import Event, RunRecord, events_of
from orchestrator.store import MemoryStore
from protocol.bus import MemoryBus
from protocol.history import Dispatched, RunStarted
from protocol.keys import events_stream

pytestmark = pytest.mark.timeout(30)


def _event(run: RunRecord, seq: int) -> Event:
    body = RunStarted(goal=run.goal) if seq == 1 else Dispatched(capability="c")
    return Event(seq=seq, run_id=run.run_id, task_id="" if seq == 1 else "t", time=time.time(), body=body)


async def _mirrored(bus: MemoryBus, run_id: str) -> list[int]:
    return [e.seq for _, env in await bus.read(events_stream(run_id)) for e in events_of(env)]


async def _until_mirrored(bus: MemoryBus, seqs: dict[str, list[int]]) -> None:
    with anyio.fail_after(10):
        while True:
            if all([await _mirrored(bus, run_id) == want for run_id, want in seqs.items()]):
                return
            await anyio.sleep(0.01)


async def test_runs_followed_past_one_commits_catch_up_get_their_new_events_after_their_history() -> None:
    # 150 runs followed at once: a commit reads the history of 100; the other 50 get events meanwhile, which
    # must wait for their own history to go out first.
    bus, store = MemoryBus(), MemoryStore()
    acker = Acknowledger(bus, store, sender="manager", mirror="followed", history_ttl_s=60,
                         on_committed=lambda _: None)
    runs = [RunRecord.new(Job(goal="g"), f"r{i}") for i in range(150)]
    for run in runs:
        await store.create_run(run)
        await store.record_all(run, [(None, _event(run, 1)), (None, _event(run, 2))])
    acker.set_followers([(run.run_id, 0) for run in runs] + [("not-a-run", 0)])
    for run in runs:
        event = _event(run, 3)
        await store.record(run, None, event)
        acker.mirror(event)
    async with anyio.create_task_group() as tg:
        tg.start_soon(acker.run)
        await _until_mirrored(bus, {run.run_id: [1, 2, 3] for run in runs})
        tg.cancel_scope.cancel()
    assert await _mirrored(bus, "not-a-run") == []


async def test_a_run_no_longer_followed_is_not_mirrored() -> None:
    bus, store = MemoryBus(), MemoryStore()
    acker = Acknowledger(bus, store, sender="manager", mirror="followed", history_ttl_s=60,
                         on_committed=lambda _: None)
    run, other = RunRecord.new(Job(goal="g"), "r"), RunRecord.new(Job(goal="g"), "other")
    for r in (run, other):
        await store.create_run(r)
    async with anyio.create_task_group() as tg:
        tg.start_soon(acker.run)
        acker.set_followers([("r", 0)])
        for seq in (1, 2):
            await store.record(run, None, event := _event(run, seq))
            acker.mirror(event)
        await _until_mirrored(bus, {"r": [1, 2]})
        acker.set_followers([("other", 0)])
        for r in (run, other):  # both in one commit: the one for the other run, which is followed
            await store.record(r, None, event := _event(r, 3 if r is run else 1))
            acker.mirror(event)
        await _until_mirrored(bus, {"other": [1]})
        tg.cancel_scope.cancel()
    assert await _mirrored(bus, "r") == [1, 2]
