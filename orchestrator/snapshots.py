"""Run summaries for ``status`` on other machines, rebuilt only where a task changed.

A summary of a big run is the whole run as JSON. Rendering every task each time made the
manager's snapshot refresh cost O(tasks) of Python work twice a second; here each task's JSON is
kept until an event about that task is recorded, so a refresh costs what changed plus a join.
"""

from __future__ import annotations

import json

from orchestrator.records import RunRecord

__all__ = ("Snapshots",)


class Snapshots:
    """Cached per-task JSON of the runs a manager holds."""

    def __init__(self) -> None:
        self._tasks: dict[str, dict[str, bytes]] = {}

    def changed(self, run_id: str, task_id: str) -> None:
        """Forget the task's cached JSON: an event about it was recorded."""
        cached = self._tasks.get(run_id)
        if cached is not None:
            cached.pop(task_id, None)

    def forget(self, run_id: str) -> None:
        """The run was let go."""
        self._tasks.pop(run_id, None)

    def render(self, run: RunRecord) -> bytes:
        """The run's summary (``RunRecord.summary()``) as JSON."""
        cached = self._tasks.setdefault(run.run_id, {})
        parts = []
        for task in run.tasks.values():
            part = cached.get(task.id)
            if part is None:
                part = cached[task.id] = _dumps(task.summary())
            parts.append(part)
        head = _dumps(run.summary(with_tasks=False))
        return head[:-1] + b', "tasks": [' + b", ".join(parts) + b"]}"


def _dumps(value: object) -> bytes:
    return json.dumps(value, default=str).encode()
