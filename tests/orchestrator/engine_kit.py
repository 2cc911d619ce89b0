"""Driving a RunEngine by hand in tests: a clock, a run, and shorthands for inputs."""

from __future__ import annotations

from typing import Any

from orchestrator.engine import (
    Checked,
    Effect,
    Input,
    Instant,
    Override,
    Presence,
    Reply,
    RequestCheck,
    RunEngine,
    SendAssign,
    Start,
    Tick,
)
from orchestrator.job import parse_job
from orchestrator.records import RunRecord
from protocol.history import HistoryEvent, RunFold
from protocol.messages import Done, Failed, OverrideAction, Verdict, VerifyResponse
from protocol.states import VerifyStage

WALL0 = 1_800_000_000.0  # the wall clock starts here; the monotonic clock at 0


class Driver:
    """One run's engine, a clock, and everything it emitted so far."""

    def __init__(self, job: dict[str, Any], *, judge: bool = False, served: frozenset[str] | None = None,
                 window: int | None = None) -> None:
        self.run = RunRecord.new(parse_job(job), "run-1", now=WALL0)
        self.engine = RunEngine(self.run, judge=judge, served=served, window=window)
        self.mono = 0.0
        self.history: list[HistoryEvent] = []
        self.effects: list[Effect] = []

    def at(self) -> Instant:
        return Instant(WALL0 + self.mono, self.mono)

    def feed(self, change: Input) -> list[Effect]:
        effects = self.engine.apply(change)
        self.effects.extend(effects)
        self.history.extend(e for e in effects if isinstance(e, HistoryEvent))
        return effects

    def start(self) -> list[Effect]:
        return self.feed(Start(self.at()))

    def advance(self, seconds: float) -> list[Effect]:
        self.mono += seconds
        return self.feed(Tick(self.at()))

    def done(self, task_id: str, output: Any, *, attempt: int | None = None, capability: str | None = None,
             sender: str = "w1", self_check: bool = False, tokens: int = 0,
             signer: str | None = None) -> list[Effect]:
        task = self.run.tasks[task_id]
        return self.feed(Reply(task_id, task.attempt if attempt is None else attempt, sender,
                               capability or task.capability, Done(output=output, self_check=self_check,
                                                                   tokens=tokens), self.at(), signer))

    def failed(self, task_id: str, error: str = "boom", *, retryable: bool = True) -> list[Effect]:
        task = self.run.tasks[task_id]
        return self.feed(Reply(task_id, task.attempt, "w1", task.capability,
                               Failed(error=error, retryable=retryable), self.at()))

    def verify_response(self, task_id: str, passed: bool, feedback: str = "") -> list[Effect]:
        task = self.run.tasks[task_id]
        return self.feed(Reply(task_id, task.attempt, "w1", task.capability,
                               VerifyResponse(verdict=Verdict(passed=passed, feedback=feedback)), self.at()))

    def checked(self, task_id: str, stage: VerifyStage, passed: bool, feedback: str = "",
                verifier: str = "") -> list[Effect]:
        task = self.run.tasks[task_id]
        verdict = Verdict(passed=passed, feedback=feedback, verifier=verifier or str(stage))
        return self.feed(Checked(task_id, task.attempt, stage, verdict, self.at()))

    def override(self, task_id: str, action: OverrideAction, feedback: str = "", by: str = "alice") -> list[Effect]:
        return self.feed(Override(task_id, action, feedback, by, self.at()))

    def presence(self, *capabilities: str) -> list[Effect]:
        return self.feed(Presence(frozenset(capabilities), self.at()))

    def fold(self) -> RunFold:
        fold = RunFold()
        for event in self.history:
            fold.apply(event)
        return fold


def sent(effects: list[Effect]) -> list[str]:
    """The task ids the effects send assigns for."""
    return [e.task_id for e in effects if isinstance(e, SendAssign)]


def checks(effects: list[Effect]) -> list[tuple[str, VerifyStage]]:
    """The verifiers the effects ask for."""
    return [(e.task_id, e.stage) for e in effects if isinstance(e, RequestCheck)]
