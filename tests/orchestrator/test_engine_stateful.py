"""The engine under arbitrary interleavings: duplicate, late, lost and stale replies, workers leaving
and returning, every override in every state, clock ticks. Whatever happens:

- no illegal transition (the engine would raise IllegalTransition);
- each task is accepted at most once;
- the history folds back to the engine's state after every step;
- once inputs stop and time passes, the run ends within its budgets.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from orchestrator.engine import Cancel, DeadLettered, Redrive, RequestCheck
from protocol.history import Transitioned
from protocol.states import OVERRIDE_RULES, RunState, TaskState, VerifyStage
from tests.orchestrator.engine_kit import Driver

TASKS = ("a", "b", "c")
CAPABILITIES = ("x", "y")
OUTPUTS = st.sampled_from([0, 1, 2, "same"])
FEEDBACK = st.sampled_from(["", "wrong", "still wrong"])
DEADLINE_S = 600.0


def the_job(human: bool, describe: bool) -> dict[str, Any]:
    spec_a: dict[str, Any] = {"expect": 1}
    if human:
        spec_a["approval"] = "human"
    spec_b: dict[str, Any] = {"description": "a good answer"} if describe else {}
    return {"goal": "g", "budget": {"max_attempts": 3, "deadline_s": DEADLINE_S, "no_worker_s": 30,
                                    "retry_backoff_s": 1},
            "tasks": [{"id": "a", "capability": "x", "spec": spec_a},
                      {"id": "b", "capability": "y", "depends_on": ["a"], "spec": spec_b},
                      {"id": "c", "capability": "x", "spec": {"check": "tests.orchestrator.checks:is_even"}}]}


class EngineMachine(RuleBasedStateMachine):
    driver: Driver

    @initialize(human=st.booleans(), describe=st.booleans(), judge=st.booleans(),
                window=st.sampled_from([None, None, 1, 2]))
    def start(self, human: bool, describe: bool, judge: bool, window: int | None) -> None:
        self.driver = Driver(the_job(human, describe), judge=judge, window=window)
        self.driver.start()

    def _pending_checks(self) -> list[RequestCheck]:
        return [e for e in self.driver.effects if isinstance(e, RequestCheck)]

    @rule(task=st.sampled_from(TASKS), output=OUTPUTS, lag=st.sampled_from([0, 0, 0, -1, 1]),
          self_check=st.booleans(), on=st.sampled_from([None, None, None, "y"]))
    def done(self, task: str, output: Any, lag: int, self_check: bool, on: str | None) -> None:
        attempt = self.driver.run.tasks[task].attempt + lag
        self.driver.done(task, output, attempt=attempt, self_check=self_check, capability=on)

    @rule(task=st.sampled_from(TASKS), retryable=st.booleans())
    def failed(self, task: str, retryable: bool) -> None:
        self.driver.failed(task, retryable=retryable)

    @rule(task=st.sampled_from(TASKS), passed=st.booleans(), feedback=FEEDBACK)
    def verify_response(self, task: str, passed: bool, feedback: str) -> None:
        self.driver.verify_response(task, passed, feedback)

    @precondition(lambda self: bool(self._pending_checks()))
    @rule(data=st.data(), passed=st.booleans(), feedback=FEEDBACK)
    def answer_a_check(self, data: st.DataObject, passed: bool, feedback: str) -> None:
        request = data.draw(st.sampled_from(self._pending_checks()))
        self.driver.checked(request.task_id, request.stage, passed, feedback)

    @rule(task=st.sampled_from(TASKS), stage=st.sampled_from(VerifyStage), passed=st.booleans())
    def a_verdict_nobody_asked_for(self, task: str, stage: VerifyStage, passed: bool) -> None:
        self.driver.checked(task, stage, passed, "unasked")

    @rule(task=st.sampled_from((*TASKS, "ghost")), action=st.sampled_from(sorted(OVERRIDE_RULES)),
          feedback=FEEDBACK)
    def override(self, task: str, action: Any, feedback: str) -> None:
        self.driver.override(task, action, feedback)

    @rule(task=st.sampled_from(("", *TASKS)))
    def cancel(self, task: str) -> None:
        self.driver.feed(Cancel(task, "bob", "enough", self.driver.at()))

    @rule(served=st.sets(st.sampled_from(CAPABILITIES)))
    def presence(self, served: set[str]) -> None:
        self.driver.presence(*served)

    @rule(seconds=st.sampled_from([0.5, 1, 5, 20, 40]))
    def time_passes(self, seconds: float) -> None:
        due = self.driver.engine.tick_due()
        effects = self.driver.advance(seconds)
        if self.driver.mono < due:  # what lets the manager skip the tick
            assert effects == [], f"a tick at {self.driver.mono} before tick_due() {due} changed the run"

    @rule(task=st.sampled_from(TASKS))
    def dead_letter(self, task: str) -> None:
        self.driver.feed(DeadLettered(task, self.driver.run.tasks[task].attempt, "poison", self.driver.at()))

    @rule()
    def redrive(self) -> None:
        self.driver.feed(Redrive(self.driver.at()))

    @invariant()
    def accepted_at_most_once(self) -> None:
        accepted = Counter(e.task_id for e in self.driver.history
                           if isinstance(e.body, Transitioned) and e.body.to_state is TaskState.ACCEPTED)
        assert all(n == 1 for n in accepted.values()), accepted

    @invariant()
    def history_folds_back_to_the_state(self) -> None:
        fold, run = self.driver.fold(), self.driver.run
        assert (fold.state, fold.tokens) == (run.state, run.tokens)
        for task in run.tasks.values():
            folded = fold.tasks[task.id]
            assert (folded.state, folded.attempt, folded.waiting) == (task.state, task.attempt, task.waiting), task.id

    @invariant()
    def history_is_numbered_and_ends_last(self) -> None:
        seqs = [e.seq for e in self.driver.history]
        assert seqs == list(range(1, len(seqs) + 1))
        ended = [i for i, e in enumerate(self.driver.history) if e.body.kind == "run_finished"]
        assert ended in ([], [len(seqs) - 1])

    @invariant()
    def every_unfinished_task_moves_or_names_its_wait(self) -> None:
        run = self.driver.run
        for task in run.tasks.values():
            if task.terminal or run.state is not RunState.RUNNING:
                continue
            if task.state is TaskState.VERIFY_DONE and task.verify_stage is VerifyStage.HUMAN:
                assert task.waiting is not None
                assert task.waiting.for_ == "person"
            if task.state is TaskState.NOT_DONE and task.attempt == 0:
                if task.waiting is None:  # held back by the dispatch window, which the history says
                    assert run.held > 0
                    assert self.driver.fold().held > 0
                else:
                    assert task.waiting.for_ == "dependency"

    def teardown(self) -> None:
        """Inputs stop; time passes: the run must end, within its deadline."""
        if not hasattr(self, "driver"):
            return
        for _ in range(int(DEADLINE_S // 40) + 2):
            if self.driver.engine.finished:
                break
            self.driver.advance(40)
        assert self.driver.engine.finished, {t.id: t.state for t in self.driver.run.tasks.values()}
        assert all(t.terminal for t in self.driver.run.tasks.values())


EngineMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])
TestEngine = EngineMachine.TestCase
