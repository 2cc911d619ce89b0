"""The run as the console draws it, folded from a history: tree order, attempts, verdicts, decisions, guards."""

from __future__ import annotations

from typing import Any

from orchestrator.ui.view import RunPage
from protocol.history import (
    Dispatched,
    HistoryEvent,
    OverrideGiven,
    OverrideRefused,
    RunStarted,
    TaskOutline,
    Transitioned,
    VerdictGiven,
    Waiting,
    WaitingChanged,
)
from protocol.states import TaskEvent, TaskState, VerifyStage

S, E = TaskState, TaskEvent


def history() -> list[HistoryEvent]:
    bodies: list[tuple[str, int, str, Any]] = [
        ("", 0, "m", RunStarted(goal="g", tasks=(TaskOutline(id="child", capability="c", depends_on=("root",)),
                                                  TaskOutline(id="root", capability="c")))),
        ("root", 1, "m", Dispatched(capability="c")),
        ("root", 1, "w1", Transitioned(event=E.DONE, from_state=S.NOT_DONE, to_state=S.DONE, output="one",
                                       tokens=5, duration_s=0.5)),
        ("root", 1, "m", Transitioned(event=E.VERIFY, from_state=S.DONE, to_state=S.VERIFY_DONE)),
        ("root", 1, "judge", Transitioned(
            event=E.REJECT, from_state=S.VERIFY_DONE, to_state=S.REDO,
            verdict=VerdictGiven(stage=VerifyStage.JUDGE, passed=False, verifier="judge", feedback="shorter"))),
        ("root", 1, "operator:bob", OverrideRefused(action="approve", reason="not waiting for a person")),
        ("root", 2, "m", Transitioned(event=E.REDISPATCH, from_state=S.REDO, to_state=S.NOT_DONE)),
        ("root", 2, "w2", Transitioned(event=E.DONE, from_state=S.NOT_DONE, to_state=S.DONE, output="one")),
        ("root", 2, "m", Transitioned(event=E.EXHAUST, from_state=S.DONE, to_state=S.FAILED, guard="loop",
                                      reason="the redo returned the same output")),
        ("child", 0, "m", WaitingChanged(waiting=Waiting.model_validate({"for": "dependency", "since": 1.0,
                                                                        "on": ["root"]}))),
    ]
    return [HistoryEvent(seq=i, run_id="r", task_id=t, attempt=a, time=float(i), actor=actor, body=body)
            for i, (t, a, actor, body) in enumerate(bodies, start=1)]


def test_attempts_keep_output_verdict_decision_and_the_guard_that_ended_the_task() -> None:
    page = RunPage()
    for event in history():
        page.apply(event)
    run = page.to_json()
    assert [(t["id"], t["depth"]) for t in run["tasks"]] == [("root", 0), ("child", 1)]  # under its dependency
    root, child = run["tasks"]
    assert (root["state"], root["guard"], root["reason"]) == ("failed", "loop", "the redo returned the same output")
    first, second = root["attempts"]
    assert (first["worker"], first["output"], first["tokens"], first["outcome"]) == ("w1", "one", 5, "rejected")
    assert [(v["verifier"], v["passed"], v["feedback"]) for v in first["verdicts"]] == [("judge", False, "shorter")]
    assert [(d["by"], d["applied"], d["reason"]) for d in first["decisions"]] == [
        ("operator:bob", False, "not waiting for a person")]
    assert (second["worker"], second["outcome"]) == ("w2", "failed")
    assert root["actions"] == []  # ended: nothing left to decide
    assert child["waiting"]["text"] == "waiting for root"
    assert child["actions"] == ["redo", "cancel"]
    assert run["actions"] == ["cancel"]


def test_an_event_seen_twice_changes_nothing() -> None:
    once, twice = RunPage(), RunPage()
    for event in history():
        once.apply(event)
        twice.apply(event)
        twice.apply(event)
    assert once.to_json() == twice.to_json()


def test_a_whole_run_cancel_is_a_note_on_the_run_not_a_row() -> None:
    page = RunPage()
    events = history()
    events.append(HistoryEvent(seq=len(events) + 1, run_id="r", task_id="", attempt=0, time=99.0, actor="carol",
                               body=OverrideGiven(action="cancel", feedback="wrong goal")))
    for event in events:
        page.apply(event)
    run = page.to_json()
    assert [t["id"] for t in run["tasks"]] == ["root", "child"]
    assert run["note"] == "cancel by carol: wrong goal"
