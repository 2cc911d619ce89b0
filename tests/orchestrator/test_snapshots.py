"""The cached run summary is the same JSON as the run's summary, whatever changed since the last one."""

from __future__ import annotations

import json

from orchestrator.job import parse_job
from orchestrator.records import RunRecord
from orchestrator.snapshots import Snapshots


def test_a_cached_summary_follows_the_tasks_that_changed() -> None:
    run = RunRecord.new(parse_job({"goal": "g", "tasks": [{"id": "a", "capability": "x"},
                                                          {"id": "b", "capability": "x"}]}))
    snapshots = Snapshots()
    assert json.loads(snapshots.render(run)) == run.summary()
    run.tasks["a"].output, run.tokens = {"n": 1}, 7
    snapshots.changed(run.run_id, "a")
    assert json.loads(snapshots.render(run)) == run.summary()
    run.tasks["b"].output = 2  # not reported as changed: the cached JSON stays until it is
    assert json.loads(snapshots.render(run))["tasks"][1]["output"] is None
    snapshots.changed(run.run_id, "b")
    assert json.loads(snapshots.render(run)) == run.summary()
