"""The durable run ledger: SQLite in WAL mode, the source of truth for runs on the manager's side.

Writes are group-committed: ``record`` buffers rows and returns; ``sync`` writes everything
buffered in one transaction (fsync'd, ``synchronous=FULL``) and returns once it is on disk.
The manager acknowledges a bus message only after a ``sync`` that covers its effects, so a
crash loses no acknowledged work, while hundreds of transitions share one fsync.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from itertools import islice
from pathlib import Path
from typing import TypeVar

import anyio
import anyio.to_thread
from pydantic import BaseModel

from orchestrator.job import Job
from orchestrator.records import Event, RunRecord, TaskRecord
from orchestrator.store import Store

__all__ = ("SQLiteStore", "read_history")

# A run's job has a table of its own: SQLite rewrites a whole row when any column of it changes, and the
# run row changes at every commit of the run. Kept in ``runs.job``, as it was, a 100,000-task job's 36 MB
# were read, copied and written to the log again at every group commit. ``runs.job`` stays in the schema,
# empty for new runs, so ledgers written before the jobs table still open (``_open`` moves their jobs over).
#
# The job row holds the job without its tasks (goal, budget) and the tasks' ids in the job's order: each
# task's definition is in its task row from the run's creation on. Serializing the whole job at creation
# was a 100,000-task run's biggest transient (36 MB of JSON and the serializer's 64 MB buffer). Jobs moved
# over from an older ledger keep their tasks, and no ``task_order``.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, state TEXT NOT NULL, created REAL NOT NULL,
                                 job TEXT NOT NULL, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (run_id TEXT PRIMARY KEY, job TEXT NOT NULL, task_order TEXT);
CREATE TABLE IF NOT EXISTS tasks (run_id TEXT NOT NULL, task_id TEXT NOT NULL, record TEXT NOT NULL,
                                  PRIMARY KEY (run_id, task_id));
CREATE TABLE IF NOT EXISTS events (run_id TEXT NOT NULL, seq INTEGER NOT NULL, record TEXT NOT NULL,
                                   PRIMARY KEY (run_id, seq));
"""


def _dumps(model: BaseModel) -> str:
    return model.model_dump_json(by_alias=True)


_RunRow = tuple[str, str, float, str]
_JobRow = tuple[str, str, str]
_TaskRow = tuple[str, str, str]
_EventRow = tuple[str, int, str]

# A batch of more rows than this (the creation or start of a big run, not the replies of a busy second) is
# serialized and written a slice at a time in the event loop, instead of all at once and then in a thread.
_BIG_BATCH_ROWS = 50_000
_SLICE_ROWS = 5_000
_T = TypeVar("_T")
_PUT_TASK = "INSERT OR REPLACE INTO tasks (run_id, task_id, record) VALUES (?, ?, ?)"


def _slices(items: Iterable[_T], size: int = _SLICE_ROWS) -> Iterator[list[_T]]:
    """``items`` a list of ``size`` at a time, without listing them all first."""
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def _task_rows(tasks: Iterable[tuple[tuple[str, str], TaskRecord]]) -> list[_TaskRow]:
    return [(run_id, task_id, _dumps(task)) for (run_id, task_id), task in tasks]


def _event_rows(events: Iterable[Event]) -> list[_EventRow]:
    return [(e.run_id, e.seq, _dumps(e)) for e in events]


_RUN_ROW_EXCLUDES = {"tasks", "job"}


def _run_row(run: RunRecord) -> _RunRow:
    # The run row holds the run without its tasks and its job (rows of their own, the job's written once),
    # so recording a transition costs the same in a run of 5 tasks or of 100,000.
    return run.run_id, str(run.state), run.created, run.model_dump_json(by_alias=True, exclude=_RUN_ROW_EXCLUDES)


class SQLiteStore(Store):
    """Runs, tasks and events in one SQLite file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._db: sqlite3.Connection | None = None
        # Buffered until the next sync: the latest object of each run and task (serialized once per
        # batch, however often it changed), the new jobs, and every event.
        self._runs: dict[str, RunRecord] = {}
        self._tasks: dict[tuple[str, str], TaskRecord] = {}
        self._events: list[Event] = []
        self._jobs: dict[str, tuple[str, str]] = {}
        self._lock = anyio.Lock()

    async def __aenter__(self) -> SQLiteStore:
        await anyio.to_thread.run_sync(self._open)
        return self

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.executescript(_SCHEMA)
        # A ledger written before the jobs table has its jobs in the run rows: moved over, in one transaction.
        db.execute("BEGIN IMMEDIATE")
        db.execute("INSERT OR IGNORE INTO jobs (run_id, job, task_order) SELECT run_id, job, NULL FROM runs "
                   "WHERE job != ''")
        db.execute("UPDATE runs SET job = '' WHERE job != ''")
        db.execute("COMMIT")
        self._db = db

    async def aclose(self) -> None:
        if self._db is not None:
            await self.sync()
            db, self._db = self._db, None
            await anyio.to_thread.run_sync(db.close)

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("use 'async with SQLiteStore(path)' before using the store")
        return self._db

    # -- writes: buffered, then group-committed ----------------------------------------------

    async def create_run(self, run: RunRecord) -> None:
        job = (run.job.model_dump_json(by_alias=True, exclude={"tasks"}),
               json.dumps(list(run.tasks), separators=(",", ":")))
        if len(run.tasks) > _BIG_BATCH_ROWS:
            await self._create_big_run(run, job)
            return
        self._jobs[run.run_id] = job
        self._runs[run.run_id] = run
        for task in run.tasks.values():
            self._tasks[(run.run_id, task.id)] = task
        await anyio.lowlevel.checkpoint()  # durable at the next sync, with whatever else is buffered by then

    async def _create_big_run(self, run: RunRecord, job: tuple[str, str]) -> None:
        # Written now, in a transaction of its own, a slice of task rows at a time with the event loop free in
        # between: buffered for the next sync, a 100,000-task run's rows were ~1 s of the loop at once. The
        # records do not change meanwhile: nothing else has the run until this returns (Store.create_run).
        async with self._lock:
            await anyio.to_thread.run_sync(self._insert, [_run_row(run)], [(run.run_id, *job)], (), ())
            try:
                for tasks in _slices(run.tasks.values()):
                    rows = _task_rows(((run.run_id, task.id), task) for task in tasks)
                    await anyio.to_thread.run_sync(self._insert_tasks, rows)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await anyio.to_thread.run_sync(self._rollback)
                raise
            await anyio.to_thread.run_sync(self._commit)

    # Recording only buffers, and does not yield: a reply is then handled in one step of the event loop, and the
    # replies of one read from the bus in one go (a yield per reply was a sixth of a big run's throughput).
    async def record(self, run: RunRecord, task: TaskRecord | None, event: Event) -> None:
        self._buffer(run, task, event)

    async def record_all(self, run: RunRecord, changes: Sequence[tuple[TaskRecord | None, Event]]) -> None:
        for task, event in changes:
            self._buffer(run, task, event)

    def _buffer(self, run: RunRecord, task: TaskRecord | None, event: Event) -> None:
        self._runs[run.run_id] = run
        if task is not None:
            self._tasks[(run.run_id, task.id)] = task
        self._events.append(event)

    async def sync(self) -> None:
        if not (self._runs or self._tasks or self._events or self._lock.locked()):
            return  # nothing buffered and no write under way: already durable (most callers, most of the time)
        async with self._lock:
            if not (self._runs or self._tasks or self._events):
                return
            # Serialized in the event loop, without yielding, so the batch is one consistent moment of the records.
            runs = [_run_row(run) for run in self._runs.values()]
            jobs = [(run_id, job, order) for run_id, (job, order) in self._jobs.items()]
            tasks, events = self._tasks, self._events
            self._runs, self._tasks, self._events, self._jobs = {}, {}, [], {}
            if len(tasks) + len(events) <= _BIG_BATCH_ROWS:
                await anyio.to_thread.run_sync(self._write, runs, jobs, _task_rows(tasks.items()), _event_rows(events))
                return
            # A big batch (the creation or start of a big run): its rows are written as they are serialized,
            # a slice at a time and still without yielding, and only the commit (the fsync) leaves the loop.
            # Serialized all at once, the JSON of a 100,000-task run's start was a sixth of the manager's peak.
            self._insert(runs, jobs, map(_task_rows, _slices(tasks.items())), map(_event_rows, _slices(events)))
            del tasks, events
            await anyio.to_thread.run_sync(self._commit)

    def _write(self, runs: list[_RunRow], jobs: list[_JobRow], tasks: list[_TaskRow], events: list[_EventRow]) -> None:
        self._insert(runs, jobs, [tasks], [events])
        self._commit()

    def _insert(self, runs: list[_RunRow], jobs: list[_JobRow], task_slices: Iterable[list[_TaskRow]],
                event_slices: Iterable[list[_EventRow]]) -> None:
        """Begin a transaction and write the rows into it, or roll it back; the caller commits."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany("INSERT INTO runs (run_id, state, created, job, record) VALUES (?, ?, ?, '', ?) "
                           "ON CONFLICT(run_id) DO UPDATE SET state = excluded.state, record = excluded.record",
                           runs)
            db.executemany("INSERT OR IGNORE INTO jobs (run_id, job, task_order) VALUES (?, ?, ?)", jobs)
            for rows in task_slices:
                db.executemany(_PUT_TASK, rows)
            for event_rows in event_slices:
                db.executemany("INSERT OR IGNORE INTO events (run_id, seq, record) VALUES (?, ?, ?)", event_rows)
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _insert_tasks(self, rows: list[_TaskRow]) -> None:
        self.db.executemany(_PUT_TASK, rows)

    def _rollback(self) -> None:
        self.db.execute("ROLLBACK")

    def _commit(self) -> None:
        try:
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    # -- reads: see everything recorded so far ----------------------------------------------

    async def get_run(self, run_id: str) -> RunRecord | None:
        await self.sync()
        return await anyio.to_thread.run_sync(self._get_run, run_id)

    def _get_run(self, run_id: str) -> RunRecord | None:
        row = self.db.execute("SELECT runs.record, jobs.job, jobs.task_order FROM runs JOIN jobs USING (run_id) "
                              "WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            return None
        # Each row straight from JSON to its model, one at a time: parsing every row to dicts first, then
        # validating the lot, held the run about three times over (10 KB a task at 50,000 tasks).
        data = json.loads(row[0])
        job = data["job"] = Job.model_validate_json(row[1])
        order = [t.id for t in job.tasks] if row[2] is None else json.loads(row[2])
        stored = {task_id: TaskRecord.model_validate_json(rec) for task_id, rec in
                  self.db.execute("SELECT task_id, record FROM tasks WHERE run_id = ?", (run_id,))}
        data["tasks"] = {task_id: stored.pop(task_id) for task_id in order if task_id in stored}  # the job's order
        run = RunRecord.model_validate(data)
        run.release_task_defs()
        return run

    async def has_run(self, run_id: str) -> bool:
        await self.sync()
        return await anyio.to_thread.run_sync(
            lambda: self.db.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is not None)

    async def running_runs(self) -> list[RunRecord]:
        runs = [await self.get_run(run_id) for run_id in await self.run_ids(state="running")]
        return [r for r in runs if r is not None]

    async def events(self, run_id: str, after: int = 0) -> list[Event]:
        await self.sync()
        rows = await anyio.to_thread.run_sync(
            lambda: self.db.execute("SELECT record FROM events WHERE run_id = ? AND seq > ? ORDER BY seq",
                                    (run_id, after)).fetchall())
        return [Event.model_validate_json(r[0]) for r in rows]

    async def run_ids(self, *, state: str | None = None) -> list[str]:
        await self.sync()
        query, args = "SELECT run_id FROM runs ORDER BY created", ()
        if state is not None:
            query, args = "SELECT run_id FROM runs WHERE state = ? ORDER BY created", (state,)  # type: ignore[assignment]
        rows = await anyio.to_thread.run_sync(lambda: self.db.execute(query, args).fetchall())
        return [r[0] for r in rows]


def read_history(path: str | Path, run_id: str) -> list[Event] | None:
    """A run's history straight from a ledger file, read-only (a running manager may hold it); None: no such run.

    For a run whose history is on no bus: one nobody followed, once its manager has stopped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ledger at {path}")
    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        if db.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
            return None
        rows = db.execute("SELECT record FROM events WHERE run_id = ? ORDER BY seq", (run_id,)).fetchall()
    finally:
        db.close()
    return [Event.model_validate_json(r[0]) for r in rows]
