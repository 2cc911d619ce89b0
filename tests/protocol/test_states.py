"""The task state machine: every (state, event) pair against a table written out by hand, plus a random walk."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from protocol.errors import IllegalTransition, TaskError
from protocol.states import TaskEvent, TaskState, transition

S, E = TaskState, TaskEvent

# Written out by hand, not derived from TRANSITIONS: a change to the table must change this too.
# None means the event is illegal in that state.
EXPECTED: dict[tuple[str, str], str | None] = {
    # not_done
    ("not_done", "done"): "done",
    ("not_done", "retry"): "not_done",
    ("not_done", "verify"): None,
    ("not_done", "pass"): None,
    ("not_done", "reject"): None,
    ("not_done", "redispatch"): None,
    ("not_done", "exhaust"): "failed",
    ("not_done", "cancel"): "cancelled",
    # done
    ("done", "done"): None,
    ("done", "retry"): None,
    ("done", "verify"): "verify_done",
    ("done", "pass"): None,
    ("done", "reject"): None,
    ("done", "redispatch"): None,
    ("done", "exhaust"): "failed",
    ("done", "cancel"): "cancelled",
    # verify_done
    ("verify_done", "done"): None,
    ("verify_done", "retry"): None,
    ("verify_done", "verify"): None,
    ("verify_done", "pass"): "accepted",
    ("verify_done", "reject"): "redo",
    ("verify_done", "redispatch"): None,
    ("verify_done", "exhaust"): "failed",
    ("verify_done", "cancel"): "cancelled",
    # redo
    ("redo", "done"): None,
    ("redo", "retry"): None,
    ("redo", "verify"): None,
    ("redo", "pass"): None,
    ("redo", "reject"): None,
    ("redo", "redispatch"): "not_done",
    ("redo", "exhaust"): "failed",
    ("redo", "cancel"): "cancelled",
    # accepted: terminal
    ("accepted", "done"): None,
    ("accepted", "retry"): None,
    ("accepted", "verify"): None,
    ("accepted", "pass"): None,
    ("accepted", "reject"): None,
    ("accepted", "redispatch"): None,
    ("accepted", "exhaust"): None,
    ("accepted", "cancel"): None,
    # failed: terminal
    ("failed", "done"): None,
    ("failed", "retry"): None,
    ("failed", "verify"): None,
    ("failed", "pass"): None,
    ("failed", "reject"): None,
    ("failed", "redispatch"): None,
    ("failed", "exhaust"): None,
    ("failed", "cancel"): None,
    # cancelled: terminal
    ("cancelled", "done"): None,
    ("cancelled", "retry"): None,
    ("cancelled", "verify"): None,
    ("cancelled", "pass"): None,
    ("cancelled", "reject"): None,
    ("cancelled", "redispatch"): None,
    ("cancelled", "exhaust"): None,
    ("cancelled", "cancel"): None,
}

TERMINAL = {"accepted", "failed", "cancelled"}


def test_expected_table_covers_every_pair() -> None:
    assert set(EXPECTED) == {(s.value, e.value) for s in TaskState for e in TaskEvent}


@pytest.mark.parametrize(("state", "event"), sorted(EXPECTED), ids=[f"{s}-{e}" for s, e in sorted(EXPECTED)])
def test_every_state_event_pair(state: str, event: str) -> None:
    expected = EXPECTED[state, event]
    if expected is None:
        with pytest.raises(IllegalTransition) as info:
            transition(TaskState(state), TaskEvent(event), task_id="t1")
        assert (info.value.state, info.value.event, info.value.task_id) == (state, event, "t1")
    else:
        got = transition(TaskState(state), TaskEvent(event), task_id="t1")
        assert got == expected
        assert type(got) is TaskState


@pytest.mark.parametrize(("state", "event"), sorted(EXPECTED), ids=[f"{s}-{e}" for s, e in sorted(EXPECTED)])
def test_plain_strings_behave_like_the_enums(state: str, event: str) -> None:
    expected = EXPECTED[state, event]
    if expected is None:
        with pytest.raises(IllegalTransition):
            transition(state, event)  # type: ignore[arg-type]
    else:
        assert transition(state, event) == expected  # type: ignore[arg-type]


def test_illegal_transition_names_state_event_and_task_id() -> None:
    with pytest.raises(IllegalTransition) as info:
        transition(S.ACCEPTED, E.REJECT, task_id="t-42")
    assert str(info.value) == "task 't-42': event 'reject' is not allowed in state 'accepted'"
    assert isinstance(info.value, TaskError)
    assert info.value.task_id == "t-42"


def test_illegal_transition_without_task_id() -> None:
    with pytest.raises(IllegalTransition, match=r"^event 'verify' is not allowed in state 'not_done'$") as info:
        transition(S.NOT_DONE, E.VERIFY)
    assert info.value.task_id is None


@pytest.mark.parametrize(("state", "event"), [("bogus", "done"), ("not_done", "bogus")])
def test_unknown_state_or_event_is_an_illegal_transition(state: str, event: str) -> None:
    with pytest.raises(IllegalTransition, match=rf"event '{event}' is not allowed in state '{state}'"):
        transition(state, event, task_id="t1")  # type: ignore[arg-type]


class TaskLifecycle(RuleBasedStateMachine):
    """Random event sequences through ``transition``; illegal events must leave the state alone."""

    def __init__(self) -> None:
        super().__init__()
        self.state = S.NOT_DONE
        self.terminal_reached: TaskState | None = None

    @initialize(start=st.sampled_from(list(TaskState)))
    def start(self, start: TaskState) -> None:
        self.state = start
        if start in TERMINAL:
            self.terminal_reached = start

    @rule(event=st.sampled_from(list(TaskEvent)))
    def fire(self, event: TaskEvent) -> None:
        before = self.state
        refused: IllegalTransition | None = None
        try:
            after = transition(before, event, task_id="t1")
        except IllegalTransition as exc:
            refused, after = exc, before
        if refused is None:
            assert after == EXPECTED[before.value, event.value]
        else:
            assert EXPECTED[before.value, event.value] is None
            assert (refused.state, refused.event, refused.task_id) == (before.value, event.value, "t1")
        if after == S.ACCEPTED and before != S.ACCEPTED:
            assert before == S.VERIFY_DONE, f"accepted entered from {before}"
        if after == S.REDO and before != S.REDO:
            assert before == S.VERIFY_DONE, f"redo entered from {before}"
        if self.terminal_reached is not None:
            assert after == self.terminal_reached, f"terminal {self.terminal_reached} left for {after}"
        elif after in TERMINAL:
            self.terminal_reached = after
        self.state = after

    # Steer toward the happy path often enough that accepted and the redo loop are reached.
    @precondition(lambda self: self.state in (S.NOT_DONE, S.DONE, S.VERIFY_DONE, S.REDO))
    @rule(event=st.sampled_from([E.DONE, E.VERIFY, E.PASS, E.REJECT, E.REDISPATCH]))
    def progress(self, event: TaskEvent) -> None:
        self.fire(event)

    @invariant()
    def state_is_a_task_state(self) -> None:
        assert isinstance(self.state, TaskState)

    @invariant()
    def terminal_states_stick(self) -> None:
        if self.terminal_reached is not None:
            assert self.state == self.terminal_reached


TaskLifecycle.TestCase.settings = settings(
    max_examples=200, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
test_task_lifecycle = TaskLifecycle.TestCase
