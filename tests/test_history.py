"""A run's state is a fold of its history: a recorded history replays to the state the engine had."""

from __future__ import annotations

import json
from pathlib import Path

from protocol.history import HistoryEvent, RunFold
from tests.data.record_run import record

DATA = Path(__file__).parent / "data"


def test_the_recorded_history_folds_back_to_the_engines_final_state() -> None:
    events = [HistoryEvent.model_validate(json.loads(line))
              for line in (DATA / "recorded_run.jsonl").read_text().splitlines()]
    fold = RunFold()
    for event in events:
        fold.apply(event)
    run = record().run  # the same inputs through the engine today
    assert [e.model_dump() for e in record().history] == [e.model_dump() for e in events], \
        "the history schema changed: python -m tests.data.record_run > tests/data/recorded_run.jsonl"
    assert (fold.state, fold.reason, fold.tokens) == (run.state, run.reason, run.tokens)
    for task in run.tasks.values():
        folded = fold.tasks[task.id]
        assert (folded.state, folded.attempt, folded.worker, folded.reason, folded.waiting) == \
            (task.state, task.attempt, task.worker, task.reason, task.waiting)


def test_history_round_trips_through_json_with_the_wire_names() -> None:
    line = (DATA / "recorded_run.jsonl").read_text().splitlines()[1]
    event = HistoryEvent.model_validate_json(line)
    assert json.loads(event.model_dump_json(by_alias=True)) == json.loads(line)
