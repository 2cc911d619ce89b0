"""Make ``recorded_run.jsonl``: a run driven through the real engine, its history written as JSON lines.

Run from the repository root after a change to the history schema::

    python -m tests.data.record_run > tests/data/recorded_run.jsonl
"""

from __future__ import annotations

from tests.orchestrator.engine_kit import Driver

JOB = {"goal": "Write the quarterly report", "budget": {"max_attempts": 2}, "tasks": [
    {"id": "research", "capability": "writer"},
    {"id": "draft", "capability": "writer", "depends_on": ["research"],
     "spec": {"schema": {"type": "string", "minLength": 20}}},
    {"id": "stuck", "capability": "writer"},
    {"id": "publish", "capability": "writer", "depends_on": ["draft", "stuck"]},
]}


def record() -> Driver:
    d = Driver(JOB, served=frozenset({"writer"}))
    d.mono = 0.25
    d.start()
    d.mono += 1
    d.done("research", "research: a complete answer", sender="worker-a")
    d.mono += 0.5
    d.failed("stuck", "RuntimeError: upstream API returned 503")
    d.mono += 0.5
    d.done("draft", "too short", sender="worker-a")  # the schema rejects it
    d.mono += 1
    d.failed("stuck", "RuntimeError: upstream API returned 503")
    d.mono += 1.5
    d.done("draft", "draft: a complete answer", sender="worker-a")
    return d


if __name__ == "__main__":
    for event in record().history:
        print(event.model_dump_json(by_alias=True))
