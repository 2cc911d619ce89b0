"""Where runs, tasks and their event log are kept: an interface and the in-memory store."""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Self

import anyio

from orchestrator.records import Event, RunRecord, TaskRecord

__all__ = ("MemoryStore", "Store")


class Store(abc.ABC):
    """Run records and the append-only event log.

    ``record`` writes a task's new state and the event that caused it together, so the log
    and the records never disagree.
    """

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        """Release resources; the default has none."""

    @abc.abstractmethod
    async def create_run(self, run: RunRecord) -> None:
        """Store a new run (durable once a later ``sync`` returns, or when this returns).

        Take the job (``run.job``) before returning: the manager then lets go of its task list. A store may
        read the run's records across awaits (the SQLite store writes a big run here, a slice at a time):
        the caller changes none of them, and shows the run to nothing else, until this returns.
        """

    @abc.abstractmethod
    async def record(self, run: RunRecord, task: TaskRecord | None, event: Event) -> None:
        """Persist a task's state (if any), the run's state and one event, atomically."""

    async def record_all(self, run: RunRecord, changes: Sequence[tuple[TaskRecord | None, Event]]) -> None:
        """Persist what one engine input changed, as one step: no ``sync`` may fall between the changes.

        The engine changes the records first and reports the events after, so a sync in the middle
        could make a task's state durable ahead of the history that explains it. The default records
        one change at a time; a store whose ``record`` yields must override this.
        """
        for task, event in changes:
            await self.record(run, task, event)

    async def sync(self) -> None:  # noqa: B027 - a store that writes through has nothing to flush
        """Return once everything recorded so far is durable (group commit)."""

    @abc.abstractmethod
    async def running_runs(self) -> list[RunRecord]:
        """Every run not yet finished: what a restarted manager resumes."""

    @abc.abstractmethod
    async def get_run(self, run_id: str) -> RunRecord | None:
        """A snapshot of a run, or None when unknown."""

    async def has_run(self, run_id: str) -> bool:
        """Whether the store has the run. The default reads it whole; a store overrides it with a cheaper look
        (a 100,000-task run read to learn that it exists took seconds and hundreds of MB)."""
        return await self.get_run(run_id) is not None

    @abc.abstractmethod
    async def events(self, run_id: str, after: int = 0) -> list[Event]:
        """The run's events with ``seq > after``, in order."""

    @abc.abstractmethod
    async def run_ids(self) -> list[str]:
        """Every run id, oldest first."""


class MemoryStore(Store):
    """Keeps everything in this process: for embedding and tests.

    It keeps a copy of each record as last recorded (``TaskRecord.snapshot``: shallow, as records share only what
    nothing changes), so a reader, or a manager resuming the store's runs, sees what was recorded and not a change
    made since. Like the SQLite store, recording does not yield: a reply is handled in one step of the event loop.
    """

    def __init__(self) -> None:
        self._runs: dict[str, RunRecord] = {}
        self._events: dict[str, list[Event]] = {}

    async def create_run(self, run: RunRecord) -> None:
        stored = self._runs[run.run_id] = run.snapshot()
        stored.release_task_defs()  # as the ledger keeps a job: each task's definition is in its record
        self._events.setdefault(run.run_id, [])
        await anyio.lowlevel.checkpoint()

    async def record(self, run: RunRecord, task: TaskRecord | None, event: Event) -> None:
        self._keep(run, task, event)

    async def record_all(self, run: RunRecord, changes: Sequence[tuple[TaskRecord | None, Event]]) -> None:
        for task, event in changes:
            self._keep(run, task, event)

    def _keep(self, run: RunRecord, task: TaskRecord | None, event: Event) -> None:
        stored = self._runs[run.run_id]
        if task is not None:
            stored.tasks[task.id] = task.snapshot()
        stored.state, stored.reason, stored.finished = run.state, run.reason, run.finished
        stored.tokens, stored.next_seq, stored.elapsed_s, stored.held = run.tokens, run.next_seq, run.elapsed_s, run.held
        self._events[run.run_id].append(event)  # frozen

    async def running_runs(self) -> list[RunRecord]:
        await anyio.lowlevel.checkpoint()
        return [r.snapshot() for r in self._runs.values() if r.state == "running"]

    async def get_run(self, run_id: str) -> RunRecord | None:
        await anyio.lowlevel.checkpoint()
        run = self._runs.get(run_id)
        return run.snapshot() if run else None

    async def events(self, run_id: str, after: int = 0) -> list[Event]:
        await anyio.lowlevel.checkpoint()
        return self._events.get(run_id, [])[after:]  # seq n is at index n - 1

    async def run_ids(self) -> list[str]:
        await anyio.lowlevel.checkpoint()
        return list(self._runs)

    async def has_run(self, run_id: str) -> bool:
        await anyio.lowlevel.checkpoint()
        return run_id in self._runs
