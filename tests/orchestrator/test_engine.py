"""The run engine's rules, synchronously: no bus, no sleeps, time as an input."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator.engine import Ended, Ignored, Instant, Refused, StopWork, Tick
from protocol.history import Transitioned, WaitingChanged
from protocol.states import OVERRIDE_RULES, TaskState, VerifyStage, override_allowed
from tests.orchestrator.engine_kit import WALL0, Driver, checks, sent

EVEN = "tests.orchestrator.checks:is_even"


def job(*tasks: dict[str, Any], **budget: Any) -> dict[str, Any]:
    return {"goal": "g", "tasks": list(tasks), "budget": budget}


def waits(driver: Driver, task_id: str) -> tuple[str, Any] | None:
    """What the task waits for, with the detail that goes with it (capability or dependencies)."""
    waiting = driver.run.tasks[task_id].waiting
    if waiting is None:
        return None
    return waiting.for_, waiting.on or waiting.capability


def moves(driver: Driver, task_id: str) -> list[tuple[int, str]]:
    return [(e.attempt, str(e.body.event)) for e in driver.history
            if e.task_id == task_id and isinstance(e.body, Transitioned)]


def test_start_dispatches_ready_tasks_and_names_what_the_others_wait_for() -> None:
    d = Driver(job({"id": "a", "capability": "x"}, {"id": "b", "capability": "x", "depends_on": ["a"]}))
    assert sent(d.start()) == ["a"]
    assert waits(d, "b") == ("dependency", ("a",))
    assert d.run.tasks["a"].waiting is None  # moving: sent, and presence is not known yet


def test_expect_and_schema_are_checked_by_the_engine_itself() -> None:
    d = Driver(job({"id": "a", "capability": "x", "spec": {"expect": 1}},
                   {"id": "b", "capability": "x", "depends_on": ["a"]}))
    d.start()
    effects = d.done("a", 1)
    assert checks(effects) == []  # data checks need no round trip through the shell
    assert sent(effects) == ["b"]
    assert d.run.tasks["b"].waiting is None
    end = d.done("b", "anything")  # no checks apply: accepted at once
    assert [e for e in end if isinstance(e, Ended)] == [Ended(state="accepted", reason="")]  # type: ignore[arg-type]
    assert moves(d, "a") == [(1, "done"), (1, "verify"), (1, "pass")]


def test_a_check_function_runs_in_the_shell_and_its_rejection_sends_the_next_attempt_with_the_feedback() -> None:
    d = Driver(job({"id": "a", "capability": "x", "spec": {"check": EVEN}}))
    d.start()
    assert checks(d.done("a", 3)) == [("a", VerifyStage.SPEC)]
    effects = d.checked("a", VerifyStage.SPEC, False, "odd")
    assert sent(effects) == ["a"]
    task = d.run.tasks["a"]
    assert (task.attempt, task.state, task.redo[-1].feedback) == (2, TaskState.NOT_DONE, "odd")


def test_a_failed_expect_redoes_with_what_was_expected() -> None:
    d = Driver(job({"id": "a", "capability": "x", "spec": {"expect": 1}}))
    d.start()
    assert sent(d.done("a", 2)) == ["a"]
    assert d.run.tasks["a"].redo[-1].feedback == "expected 1, got 2"


def test_stale_duplicate_and_misrouted_replies_change_nothing() -> None:
    d = Driver(job({"id": "a", "capability": "x", "spec": {"expect": 1}}))
    d.start()
    d.done("a", 2)  # rejected: attempt 2 is out
    before = d.run.model_dump()
    for effects in (d.done("a", 1, attempt=1), d.done("a", 1, capability="y"), d.done("a", 1, attempt=3)):
        assert [type(e) for e in effects] == [Ignored]
    assert d.run.model_dump() == before
    d.done("a", 1)
    assert [type(e) for e in d.done("a", 1)] == [Ignored]  # the same reply delivered twice


def test_a_reply_signed_by_another_capabilitys_key_changes_nothing_and_is_flagged() -> None:
    d = Driver(job({"id": "a", "capability": "x", "spec": {"expect": 1}}))
    d.start()
    before = d.run.model_dump()
    effects = d.done("a", 1, signer="worker:y")
    assert effects == [Ignored("reply about task 'a' (capability 'x') is signed by 'worker:y', not by 'worker:x'",
                               suspicious=True)]
    assert d.run.model_dump() == before
    assert d.done("a", 1, signer="worker:x")  # the task's own capability key is accepted
    assert d.run.tasks["a"].state is TaskState.ACCEPTED


def test_a_workers_own_rejection_is_attributed_to_its_capability() -> None:
    d = Driver(job({"id": "a", "capability": "x"}))
    d.start()
    assert checks(d.done("a", 1, self_check=True)) == [("a", VerifyStage.WORKER)]
    d.verify_response("a", False, "not ok")
    verdict = d.run.tasks["a"].attempts[0].verdict or {}
    assert verdict["verifier"] == "worker:x"


def test_the_chain_runs_spec_then_worker_then_judge_then_person() -> None:
    d = Driver(job({"id": "a", "capability": "x",
                    "spec": {"expect": 1, "description": "one", "approval": "human"}}), judge=True)
    d.start()
    assert checks(d.done("a", 1, self_check=True)) == [("a", VerifyStage.WORKER)]  # expect: passed in the engine
    assert checks(d.verify_response("a", True)) == [("a", VerifyStage.JUDGE)]
    d.checked("a", VerifyStage.JUDGE, True)
    assert waits(d, "a") == ("person", "")
    d.override("a", "approve", by="alice")
    assert d.run.tasks["a"].state is TaskState.ACCEPTED
    assert d.run.tasks["a"].waiting is None


def test_a_task_waits_for_a_missing_worker_and_fails_after_no_worker_s() -> None:
    d = Driver(job({"id": "a", "capability": "pyhton"}, no_worker_s=30))
    d.start()
    d.presence("python")
    assert waits(d, "a") == ("worker", "pyhton")
    d.mono += 29
    d.presence("python")
    assert not d.run.tasks["a"].terminal
    d.mono += 2
    effects = d.presence("python")
    task = d.run.tasks["a"]
    assert task.state is TaskState.FAILED
    assert "no live worker serves capability 'pyhton'" in task.reason
    assert any(isinstance(e, Ended) for e in effects)


def test_presence_may_be_skipped_only_when_it_would_change_nothing() -> None:
    # The manager skips a Presence for runs where it changes nothing (it visits every run each second).
    served = frozenset({"x"})
    d = Driver(job({"id": "a", "capability": "x"}, {"id": "b", "capability": "y"}, no_worker_s=30))
    d.start()
    d.presence("x")
    assert waits(d, "b") == ("worker", "y")
    assert d.engine.presence_changes(served)  # b waits for a worker: its no_worker_s must be checked each time
    d.done("b", None, capability="y", sender="w-y")  # a worker of y answered after all
    assert d.run.tasks["b"].state is TaskState.ACCEPTED
    assert not d.engine.presence_changes(served)  # same capabilities served, nobody waiting for a worker
    assert d.presence("x") == []
    assert d.engine.presence_changes(frozenset())  # x gone: a waits for a worker from now on
    d.presence()
    assert waits(d, "a") == ("worker", "x")


def test_a_worker_that_comes_back_ends_the_wait() -> None:
    d = Driver(job({"id": "a", "capability": "x"}, no_worker_s=30))
    d.start()
    d.presence()
    d.mono += 25
    d.presence("x")
    assert d.run.tasks["a"].waiting is None
    d.mono += 25
    d.presence("x")
    assert not d.run.tasks["a"].terminal
    cleared = [e.body for e in d.history if isinstance(e.body, WaitingChanged)]
    assert [w.waiting is None for w in cleared] == [False, True]


def test_no_worker_is_never_decided_without_presence() -> None:
    d = Driver(job({"id": "a", "capability": "x"}, no_worker_s=1))
    d.start()
    d.advance(100)  # ticks alone (a bus that is away) say nothing about workers
    assert not d.run.tasks["a"].terminal


def test_the_deadline_runs_on_the_monotonic_clock() -> None:
    d = Driver(job({"id": "a", "capability": "x"}, deadline_s=60))
    d.start()
    d.feed(Tick(Instant(d.at().wall + 7200, d.mono)))
    assert not d.run.tasks["a"].terminal, "a wall-clock jump of 2 h spends none of the deadline"
    d.advance(59)
    assert not d.run.tasks["a"].terminal
    effects = d.advance(2)
    assert d.run.tasks["a"].state is TaskState.FAILED
    assert [e for e in effects if isinstance(e, StopWork)] == [StopWork("", d.run.reason, "manager")]
    assert "deadline of 60 s" in d.run.reason


def test_a_retry_waits_its_backoff_then_goes_out() -> None:
    d = Driver(job({"id": "a", "capability": "x"}, retry_backoff_s=5))
    d.start()
    assert sent(d.failed("a")) == []
    assert waits(d, "a") == ("retry", "")
    assert sent(d.advance(4)) == []
    assert sent(d.advance(1)) == ["a"]
    assert d.run.tasks["a"].attempt == 2
    assert sent(d.failed("a")) == []
    assert sent(d.advance(9)) == []  # doubled: 10 s
    assert sent(d.advance(1)) == ["a"]


def test_ticks_before_tick_due_change_nothing_so_the_manager_skips_them() -> None:
    d = Driver(job({"id": "a", "capability": "x"}, retry_backoff_s=5, deadline_s=60))
    assert d.engine.tick_due() == 0.0  # no input yet: the first tick starts the clock
    d.start()
    assert d.engine.tick_due() == 60.0  # only the deadline is ahead
    d.failed("a")
    assert d.engine.tick_due() == 5.0  # the retry comes first
    before = d.run.model_dump()
    assert d.feed(Tick(Instant(WALL0 + 4.9, 4.9))) == []
    assert {k: v for k, v in d.run.model_dump().items() if k != "elapsed_s"} == \
        {k: v for k, v in before.items() if k != "elapsed_s"}
    d.mono = 5.0
    assert sent(d.feed(Tick(d.at()))) == ["a"]
    assert d.engine.tick_due() == 60.0  # 55 s of the deadline are left at mono 5
    d.mono = 59.9
    assert d.feed(Tick(d.at())) == []
    d.mono = 60.0
    d.feed(Tick(d.at()))
    assert "deadline of 60 s" in d.run.reason


def test_a_non_retryable_failure_ends_the_task_with_its_guard() -> None:
    d = Driver(job({"id": "a", "capability": "x"}))
    d.start()
    d.failed("a", "bad input", retryable=False)
    assert d.run.tasks["a"].reason == "worker failed (not retryable): bad input"


def test_the_same_output_after_a_rejection_is_a_loop() -> None:
    d = Driver(job({"id": "a", "capability": "x", "spec": {"expect": 1}}, max_attempts=5))
    d.start()
    d.done("a", 2)
    d.done("a", 2)
    assert d.run.tasks["a"].reason.startswith("loop: attempt 2 returned the same output as attempt 1")


def _in_state(state: TaskState, stage: VerifyStage | None) -> Driver:
    """A driver whose task ``a`` is in ``state`` (at ``stage`` for verify_done)."""
    spec = {"check": EVEN, "approval": "human"}
    d = Driver(job({"id": "a", "capability": "x", "spec": spec}, max_attempts=5))
    d.start()
    if state is TaskState.NOT_DONE:
        return d
    d.done("a", 1)
    if state is TaskState.VERIFY_DONE:
        if stage is VerifyStage.HUMAN:
            d.checked("a", VerifyStage.SPEC, True)
        return d
    if state is TaskState.ACCEPTED:
        d.checked("a", VerifyStage.SPEC, True)
        d.override("a", "approve")
        return d
    if state is TaskState.CANCELLED:
        d.override("a", "cancel")
    return d


@pytest.mark.parametrize("action", sorted(OVERRIDE_RULES))
@pytest.mark.parametrize(("state", "stage"), [(TaskState.NOT_DONE, None), (TaskState.VERIFY_DONE, VerifyStage.SPEC),
                                              (TaskState.VERIFY_DONE, VerifyStage.HUMAN),
                                              (TaskState.ACCEPTED, None), (TaskState.CANCELLED, None)])
def test_every_override_in_every_state_follows_the_table(action: str, state: TaskState,
                                                         stage: VerifyStage | None) -> None:
    d = _in_state(state, stage)
    task = d.run.tasks["a"]
    assert (task.state, task.verify_stage) == (state, stage)
    effects = d.override("a", action)  # type: ignore[arg-type]
    refused = [e for e in effects if isinstance(e, Refused)]
    if override_allowed(action, state, stage):
        assert not refused
    else:
        assert refused
        assert f"cannot {action}" in refused[0].reason


def test_the_history_folds_back_to_the_engines_state() -> None:
    d = Driver(job({"id": "a", "capability": "x", "spec": {"expect": 1}},
                   {"id": "b", "capability": "y", "depends_on": ["a"]}), served=frozenset({"x"}))
    d.start()
    d.done("a", 0, tokens=5)
    d.done("a", 1, tokens=7)
    fold = d.fold()
    for task in d.run.tasks.values():
        folded = fold.tasks[task.id]
        assert (folded.state, folded.attempt, folded.waiting, folded.tokens) == \
            (task.state, task.attempt, task.waiting, task.tokens)
    assert (fold.state, fold.tokens) == (d.run.state, d.run.tokens)


def test_run_level_overrides_fold_into_the_run_not_into_a_task_without_an_id() -> None:
    # A whole-run cancel and a refusal naming no task of the run are events with no task id: the console
    # and ``watch`` drew them as a task called "".
    d = Driver(job({"id": "a", "capability": "x"}, {"id": "b", "capability": "x"}))
    d.start()
    d.override("nope", "approve")
    assert d.fold().note == "approve by alice refused: run 'r' has no task 'nope'".replace("'r'", repr(d.run.run_id))
    d.override("", "cancel", feedback="wrong goal")
    fold = d.fold()
    assert sorted(fold.tasks) == ["a", "b"]
    assert fold.note == "cancel by alice: wrong goal"
    assert {t.state for t in fold.tasks.values()} == {TaskState.CANCELLED}


def test_a_workers_own_check_that_breaks_rejects_the_attempt_instead_of_leaving_it_waiting() -> None:
    d = Driver(job({"id": "a", "capability": "x"}))
    d.start()
    d.done("a", 1, self_check=True)
    assert sent(d.failed("a", "TimeoutError: ran past 300 s")) == ["a"]  # rejected, and the next attempt goes out
    verdict = d.run.tasks["a"].attempts[0].verdict or {}
    assert verdict["verifier"] == "worker:x"
    assert "the worker's own check failed: TimeoutError" in verdict["feedback"]


def test_plain_verdicts_are_one_record_shared_by_the_attempts_they_decided() -> None:
    d = Driver(job(*({"id": t, "capability": "x", "spec": {"expect": 1}} for t in "abc")))
    d.start()
    for t in "abc":
        d.done(t, 2 if t == "c" else 1)
    a, b, c = (d.run.tasks[t] for t in "abc")
    assert a.state is TaskState.ACCEPTED
    assert a.attempts[0].verdict == {"passed": True, "feedback": "", "corrections": [], "verifier": "spec",
                                     "tokens": 0}
    assert a.attempts[0].verdict is b.attempts[0].verdict  # one dict for every passing spec check
    rejected = c.attempts[0].verdict or {}
    assert rejected["passed"] is False
    assert "expected" in rejected["feedback"]  # one with feedback is its own
    assert rejected is not a.attempts[0].verdict
