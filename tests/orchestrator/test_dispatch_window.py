"""The dispatch window: at most ``window`` tasks of a run in flight; ready tasks past it are held."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.engine import Cancel, Redrive, RunEngine, Tick
from protocol.history import Dispatched, DispatchHeld, WaitingChanged
from protocol.states import RunState, TaskState
from tests.orchestrator.engine_kit import Driver, sent


def wide(n: int, **budget: Any) -> dict[str, Any]:
    return {"goal": "g", "tasks": [{"id": f"t{i}", "capability": "x"} for i in range(n)], "budget": budget}


def held_events(d: Driver) -> list[int]:
    return [e.body.held for e in d.history if isinstance(e.body, DispatchHeld)]


def test_a_full_window_holds_the_rest_and_sends_them_oldest_first_a_quarter_at_a_time() -> None:
    d = Driver(wide(20), window=8)
    assert sent(d.start()) == [f"t{i}" for i in range(8)]
    assert (d.run.held, held_events(d)) == (12, [12])  # said once for all of them
    assert all(d.run.tasks[f"t{i}"].waiting is None for i in range(8, 20))
    assert sent(d.done("t0", 1)) == []  # 7 in flight: not yet a quarter free
    assert sent(d.done("t1", 1)) == ["t8", "t9"]  # 6 in flight: fill up to 8
    assert d.run.held == 10
    for i in range(2, 20):
        d.done(f"t{i}", 1)
    assert d.run.state is RunState.ACCEPTED
    assert held_events(d) == [12, 0]  # and once when the last one went out
    assert [e.task_id for e in d.history if isinstance(e.body, Dispatched)] == [f"t{i}" for i in range(20)]


def test_a_held_task_can_be_cancelled_and_is_never_sent() -> None:
    d = Driver(wide(6), window=4)
    d.start()
    d.feed(Cancel("t5", "alice", "not needed", d.at()))
    assert d.run.tasks["t5"].state is TaskState.CANCELLED
    assert d.run.held == 1
    effects = [d.done(f"t{i}", 1) for i in range(5)]
    assert [t for e in effects for t in sent(e)] == ["t4"]
    assert d.run.tasks["t5"].attempt == 0
    assert d.run.state is RunState.CANCELLED


def test_a_dependent_that_becomes_ready_behind_a_full_window_waits_its_turn_without_a_stale_wait() -> None:
    job = wide(5)
    job["tasks"].append({"id": "after", "capability": "x", "depends_on": ["t0"]})
    d = Driver(job, window=4)
    d.start()  # t4 is held
    assert d.run.tasks["after"].waiting is not None  # waits for t0
    assert sent(d.done("t0", 1)) == ["t4"]  # the dependent is ready, behind t4, which takes the free place
    after = d.run.tasks["after"]
    assert (after.attempt, after.waiting, d.run.held) == (0, None, 1)
    cleared = [e for e in d.history if e.task_id == "after" and isinstance(e.body, WaitingChanged)]
    assert cleared[-1].body.waiting is None  # type: ignore[union-attr]
    assert sent(d.done("t1", 1)) == ["after"]


def test_a_run_resumed_with_held_tasks_sends_them_when_the_window_allows() -> None:
    d = Driver(wide(10), window=4)
    d.start()
    for i in range(4):  # all in flight end; nothing fed the engine since, as if the manager stopped here
        d.run.tasks[f"t{i}"].state = TaskState.ACCEPTED
    resumed = RunEngine(d.run, window=4)
    effects = resumed.apply(Redrive(d.at()))
    assert sent(effects) == ["t4", "t5", "t6", "t7"]
    assert d.run.held == 2


def test_the_deadline_ends_held_tasks_too() -> None:
    d = Driver(wide(6, deadline_s=10), window=2)
    d.start()
    d.mono += 11
    d.feed(Tick(d.at()))
    assert {t.state for t in d.run.tasks.values()} == {TaskState.FAILED}
    assert d.run.held == 0
    assert held_events(d) == [4, 0]


def test_without_a_window_every_ready_task_goes_at_the_start() -> None:
    d = Driver(wide(50))
    assert len(sent(d.start())) == 50
    assert (d.run.held, held_events(d)) == (0, [])


def test_a_window_of_no_tasks_is_refused_with_what_it_was() -> None:
    with pytest.raises(ValueError, match=r"at least 1 task .* not 0"):
        Driver(wide(1), window=0)
