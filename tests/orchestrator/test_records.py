"""Task records share one instance of each distinct spec, and never two specs that mean different things; a copy
of a record (what the memory store keeps) shares nothing that changes."""

from __future__ import annotations

import dataclasses
import pickle
from copy import deepcopy
from typing import Any

import pytest

from orchestrator.job import Spec, TaskDef
from orchestrator.records import AttemptRecord, TaskRecord
from protocol.states import TaskState, VerifyStage
from tests.orchestrator.engine_kit import Driver


def _record(spec: Spec, task_id: str = "t") -> TaskRecord:
    return TaskRecord.from_def(TaskDef(id=task_id, capability="c", spec=spec), 3)


def test_equal_specs_of_different_tasks_are_one_instance() -> None:
    first, second = _record(Spec(expect={"a": [1, 2]}, check="exact"), "a"), _record(Spec(expect={"a": [1, 2]},
                                                                                          check="exact"), "b")
    assert first.spec is second.spec


def test_a_record_read_back_from_json_shares_the_spec_too() -> None:
    record = _record(Spec(expect="x"))
    assert TaskRecord.model_validate_json(record.model_dump_json(by_alias=True)).spec is record.spec


@pytest.mark.parametrize(("one", "other"), [
    (Spec(expect=None), Spec()),                  # expect null is a check; no expect is none
    (Spec(expect={1, 2}), Spec(expect=[1, 2])),   # alike as JSON, not equal
    (Spec(expect=(1, 2)), Spec(expect=[1, 2])),
    (Spec(expect=1), Spec(expect=True)),
    (Spec(expect=1), Spec(expect=1.0)),
])
def test_specs_that_differ_are_not_shared(one: Spec, other: Spec) -> None:
    first, second = _record(one), _record(other)
    assert first.spec is not second.spec
    assert first.spec == one
    assert second.spec == other
    assert first.spec.has_expect == one.has_expect
    assert second.spec.has_expect == other.has_expect


def test_a_spec_that_is_not_json_data_is_kept_as_it_is() -> None:
    marker: Any = object()
    spec = Spec(expect=marker)
    assert _record(spec).spec is spec


def test_tasks_without_config_share_one_read_only_empty_config() -> None:
    a, b = _record(Spec(), "a"), _record(Spec(), "b")
    assert a.config == {}
    assert a.config is b.config
    with pytest.raises(TypeError, match="read-only"):
        a.config["k"] = 1
    assert b.config == {}
    again = TaskRecord.model_validate_json(a.model_dump_json(by_alias=True))
    assert again.config is a.config
    given = TaskRecord.from_def(TaskDef(id="c", capability="c", config={"k": 1}), 3)
    assert given.config == {"k": 1}


def test_a_snapshot_does_not_change_as_the_engine_goes_on() -> None:
    """What the memory store keeps of each recorded change: a shallow copy, so nothing it shares may change in place."""
    d = Driver({"goal": "g", "tasks": [
        {"id": "a", "capability": "x", "spec": {"expect": 1, "description": "one", "approval": "human"}},
        {"id": "b", "capability": "x", "depends_on": ["a"], "spec": {"expect": 2, "approval": "human"}}]}, judge=True)
    taken: list[tuple[Any, dict[str, Any]]] = []

    def snap() -> None:
        copy = d.run.snapshot()
        taken.append((copy, copy.model_dump()))

    steps = [d.start, lambda: d.failed("a", "boom"), lambda: d.done("a", 2),  # a retry, then a rejected output
             lambda: d.override("a", "redo", "try 1"), lambda: d.done("a", 1, self_check=True),
             lambda: d.verify_response("a", True), lambda: d.checked("a", VerifyStage.JUDGE, True),
             lambda: d.override("a", "approve"), lambda: d.done("b", 2), lambda: d.override("b", "reject", "no"),
             lambda: d.done("b", 3), lambda: d.done("b", 2), lambda: d.override("b", "accept")]
    for step in steps:
        snap()
        step()
    snap()
    assert d.run.tasks["b"].state == "accepted"
    assert d.run.tasks["a"].attempt >= 3
    for copy, dumped in taken:
        assert copy.model_dump() == dumped
    assert len({str(dumped) for _, dumped in taken}) == len(taken)  # every step changed something


def test_a_copy_of_a_record_shares_its_fields_set_and_nothing_it_changes() -> None:
    record = _record(Spec(expect=1))
    copy = record.snapshot()
    amended = record.model_copy(update={"state": TaskState.DONE, "attempt": 2})
    assert copy == record
    assert copy.model_fields_set is record.model_fields_set is amended.model_fields_set  # one set per class
    assert (amended.state, amended.attempt, record.state, record.attempt) == ("done", 2, "not_done", 0)
    copy.reason = "changed"
    assert record.reason == ""
    assert TaskRecord.model_validate_json(amended.model_dump_json(by_alias=True)) == amended


def test_an_attempt_survives_json_copies_and_pickling_and_stays_frozen() -> None:
    # A slotted dataclass inside a pydantic record: the ledger's JSON, deep copies and pickles must all keep it.
    attempt = AttemptRecord(attempt=2, worker="w1", output={"n": [1, 2]}, verdict={"passed": True}, started=1.5)
    record = TaskRecord(id="t", capability="c", attempts=(attempt,))
    assert TaskRecord.model_validate_json(record.model_dump_json()).attempts == (attempt,)
    assert deepcopy(record).attempts == (attempt,)
    assert pickle.loads(pickle.dumps(attempt)) == attempt
    assert attempt.amended(finished=3.0) == dataclasses.replace(attempt, finished=3.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        attempt.worker = "w2"  # type: ignore[misc]
