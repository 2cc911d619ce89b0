"""Run summaries for ``status`` on other machines, rebuilt only where a task changed.

A summary of a big run is the whole run as JSON. Rendering every task each time made the
manager's snapshot refresh cost O(tasks) of Python work twice a second; here each task's JSON is
kept until an event about that task is recorded, so a refresh costs what changed plus a join.

The join still makes the whole summary, and a 100,000-task run's is about 25 MB: written to Redis
twice a second, that was a tenth of the manager's time and 50 MB/s of writes. So a run's next
summary is due no sooner than its last one's size allows at ``bytes_per_s`` (a small run's at once,
a 100,000-task run's after about 12 s); the final summary of a run is never held back.

A summary is rendered as its parts (the cached pieces, in order), not joined: the bus writes a big one
a piece at a time (``Bus.put_values_in_parts``), so no 25 MB copy of it is made, by the join, by the
client or by the socket's buffer.
"""

from __future__ import annotations

import json

from orchestrator.records import RunRecord

__all__ = ("Snapshots",)


class Snapshots:
    """Cached per-task JSON of the runs a manager holds."""

    def __init__(self, *, bytes_per_s: float = 2_000_000.0) -> None:
        self.bytes_per_s = bytes_per_s
        self._tasks: dict[str, dict[str, bytes]] = {}
        self._not_before: dict[str, float] = {}  # monotonic time the run's next summary is due

    def due(self, run_id: str, now: float) -> bool:
        """Whether a refresh of the run's summary may be rendered at ``now`` (monotonic seconds)."""
        return now >= self._not_before.get(run_id, 0.0)

    def changed(self, run_id: str, task_id: str) -> None:
        """Forget the task's cached JSON: an event about it was recorded."""
        cached = self._tasks.get(run_id)
        if cached is not None:
            cached.pop(task_id, None)

    def forget(self, run_id: str) -> None:
        """The run was let go."""
        self._tasks.pop(run_id, None)
        self._not_before.pop(run_id, None)

    def render(self, run: RunRecord, *, now: float) -> list[bytes]:
        """The run's summary (``RunRecord.summary()``) as JSON in parts to be joined, rendered at ``now``
        (monotonic seconds). The parts are bytes that do not change, so they may be written after the run
        has moved on: they are the summary of this moment."""
        cached = self._tasks.setdefault(run.run_id, {})
        head = _dumps(run.summary(with_tasks=False))
        parts = [head[:-1], b', "tasks": [']
        for task in run.tasks.values():
            part = cached.get(task.id)
            if part is None:
                part = cached[task.id] = _dumps(task.summary())
            parts += (part, b", ")
        if run.tasks:
            parts.pop()  # the last separator
        parts.append(b"]}")
        self._not_before[run.run_id] = now + sum(map(len, parts)) / self.bytes_per_s
        return parts


def _dumps(value: object) -> bytes:
    return json.dumps(value, default=str).encode()
