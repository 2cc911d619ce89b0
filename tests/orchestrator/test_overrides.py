"""A person's overrides and human approval, in process: approve, reject, redo, accept, cancel; and the guards."""

from __future__ import annotations

from typing import Any

import anyio
import pytest

from orchestrator import Orchestrator
from orchestrator.api import Run
from protocol.errors import ConfigError
from protocol.history import Dispatched, HistoryEvent, OverrideGiven, Transitioned, WaitingChanged
from tests._history import transitions, verdicts
from workers import Task, Verdict, Worker

pytestmark = pytest.mark.timeout(30)


class Drafter(Worker):
    """Writes 'v<attempt>' and remembers the feedback it was given."""

    capability = "drafter"
    seen: list[tuple[str, ...]] = []

    async def handle(self, task: Task) -> Any:
        Drafter.seen.append(task.feedback)
        if isinstance(task.input, dict) and task.input.get("sleep") and task.attempt == 1:
            await anyio.sleep(task.input["sleep"])
        return f"v{task.attempt}"


@pytest.fixture(autouse=True)
def _reset() -> None:
    Drafter.seen = []


async def until(run: Run, predicate: Any) -> Any:
    with anyio.fail_after(10):
        async for event in run.events():
            if predicate(event):
                return event
    raise AssertionError("run ended before the expected event")


def awaiting_person(event: HistoryEvent) -> bool:
    body = event.body
    return isinstance(body, WaitingChanged) and body.waiting is not None and body.waiting.for_ == "person"


def job(**spec: Any) -> dict[str, Any]:
    return {"goal": "g", "tasks": [{"id": "t", "capability": "drafter", "spec": spec}]}


async def test_a_task_needing_approval_waits_in_verify_done_until_approved() -> None:
    async with Orchestrator(workers=[Drafter]) as orch:
        run = await orch.submit(job(approval="human"))
        await until(run, awaiting_person)
        assert orch.manager.snapshot(run.run_id).tasks["t"].state == "verify_done"
        await anyio.sleep(0.2)  # nothing moves on its own
        assert orch.manager.snapshot(run.run_id).tasks["t"].state == "verify_done"
        await run.approve("t", by="alice")
        result = await run.wait()
        events = [e async for e in run.events()]
    assert result.accepted
    passed = transitions(events, "pass")[0]
    assert passed.actor == "person:alice"
    assert verdicts(events)[-1].verifier == "person:alice"
    assert any(isinstance(e.body, OverrideGiven) and e.body.action == "approve" and e.actor == "alice"
               for e in events)


async def test_reject_sends_a_redo_whose_feedback_the_worker_sees() -> None:
    async with Orchestrator(workers=[Drafter]) as orch:
        run = await orch.submit(job(approval="human"))
        await until(run, awaiting_person)
        await run.reject("t", "too vague, name the numbers", by="bob")
        await until(run, lambda e: awaiting_person(e) and e.attempt == 2)
        await run.approve("t", by="bob")
        result = await run.wait()
    assert result.accepted
    assert result.outputs == {"t": "v2"}
    assert Drafter.seen == [(), ("too vague, name the numbers",)]


async def test_forced_redo_stops_the_attempt_in_flight_and_carries_the_feedback() -> None:
    async with Orchestrator(workers=[Drafter]) as orch:
        run = await orch.submit({"goal": "g", "tasks": [{"id": "t", "capability": "drafter", "input": {"sleep": 30}}]})
        await until(run, lambda e: isinstance(e.body, Dispatched))
        await anyio.sleep(0.05)
        await run.redo("t", "start over with the outline", by="carol")
        result = await run.wait()
        events = [e async for e in run.events()]
    assert result.accepted
    assert result.outputs == {"t": "v2"}
    assert Drafter.seen[-1] == ("start over with the outline",)
    assert transitions(events, "retry")[0].actor == "carol"


class SlowChecker(Worker):
    """Its own check takes far longer than a person is willing to wait."""

    capability = "slowcheck"

    async def handle(self, task: Task) -> Any:
        return "draft"

    async def verify(self, task: Task, output: Any) -> bool:
        await anyio.sleep(60)
        return False


async def test_accept_by_a_person_ends_verification_early() -> None:
    async with Orchestrator(workers=[SlowChecker]) as orch:
        run = await orch.submit({"goal": "g", "tasks": [{"id": "t", "capability": "slowcheck"}]})
        await until(run, lambda e: isinstance(e.body, Transitioned) and e.body.event == "verify")
        await run.accept("t", by="dana")
        result = await run.wait()
        events = [e async for e in run.events()]
    assert result.accepted
    assert transitions(events, "pass")[0].actor == "person:dana"


async def test_overrides_that_do_not_apply_are_refused_with_the_state() -> None:
    async with Orchestrator(workers=[Drafter]) as orch:
        run = await orch.submit(job(approval="human"))
        await until(run, awaiting_person)
        with pytest.raises(ConfigError, match="has no task 'nope'"):
            await run.approve("nope")
        await run.approve("t")
        await run.wait()
        with pytest.raises(ConfigError, match=r"in state 'accepted'|not running on this manager"):
            await run.approve("t")


async def test_cancel_by_a_person_is_recorded_with_who_and_why() -> None:
    async with Orchestrator(workers=[Drafter]) as orch:
        run = await orch.submit(job(approval="human"))
        await until(run, awaiting_person)
        await run.cancel("t", by="erin", reason="no longer needed")
        result = await run.wait()
        events = [e async for e in run.events()]
    assert result.state == "cancelled"
    cancel = transitions(events, "cancel")[0]
    assert isinstance(cancel.body, Transitioned)
    assert (cancel.actor, cancel.body.reason) == ("erin", "no longer needed")


class SameEveryTime(Worker):
    capability = "same"

    async def handle(self, task: Task) -> Any:
        return f"attempt {task.attempt}"  # different outputs, so the loop guard does not fire


class SameObjection(SameEveryTime):
    """Its own check objects the same way every time."""

    capability = "objects"

    async def verify(self, task: Task, output: Any) -> Verdict:
        return Verdict(passed=False, feedback="not good enough")


async def test_a_deterministic_check_repeating_itself_does_not_stop_a_changing_output() -> None:
    # A check says the same thing each time by nature; the output changes, so the worker may be converging.
    async with Orchestrator(workers=[SameEveryTime]) as orch:
        result = await orch.run({"goal": "g", "budget": {"max_attempts": 4}, "tasks": [
            {"id": "t", "capability": "same", "spec": {"check": "tests.orchestrator.checks:is_even"}}]})
    task = result.record.tasks["t"]
    assert (task.state, task.attempt) == ("failed", 4)
    assert task.reason.startswith("failed verification on all 4 attempts")


async def test_the_same_feedback_twice_from_a_judging_verifier_stops_the_task_and_says_which_guard() -> None:
    async with Orchestrator(workers=[SameObjection]) as orch:
        result = await orch.run({"goal": "g", "budget": {"max_attempts": 5}, "tasks": [
            {"id": "t", "capability": "objects"}]})
        events = [e async for e in orch.attach(result.run_id).events()]
    task = result.record.tasks["t"]
    assert task.state == "failed"
    assert task.attempt == 2
    assert task.reason.startswith("stuck: attempts 1 and 2 got the same feedback")
    failed = next(e.body for e in events if isinstance(e.body, Transitioned) and e.body.to_state == "failed")
    assert failed.guard == "repeated_feedback"


async def test_cancelling_an_unknown_task_is_refused_and_the_manager_keeps_going() -> None:
    async with Orchestrator(workers=[Drafter]) as orch:
        run = await orch.submit(job(approval="human"))
        await until(run, awaiting_person)
        with pytest.raises(ConfigError, match="has no task 'ghost'"):
            await run.cancel("ghost")
        await run.approve("t")
        assert (await run.wait()).accepted
