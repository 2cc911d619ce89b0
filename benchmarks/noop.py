"""A worker that does nothing: the benchmarks measure the framework, not a handler."""

from __future__ import annotations

from typing import Any

from workers import Task, Worker


class NoopWorker(Worker):
    """Returns its input unchanged."""

    capability = "noop"

    async def handle(self, task: Task) -> Any:
        return task.input
