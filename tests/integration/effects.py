"""A worker plugin with an external, idempotent side effect, for the fault tests.

``EffectWorker`` (capability ``effect``) writes to an external SQLite store named by its config
(``{"store": PATH}``). For every task it runs, in one transaction:

- appends one row to ``executions`` (run_id, task_id, attempt, pid): how often work was re-executed;
- applies its effect idempotently, keyed by the task's idempotency key ``f"{run_id}/{task_id}"``
  (``INSERT OR IGNORE INTO effects``), and when the insert actually inserted, appends a row to
  ``applied``. ``applied`` must hold exactly one row per key: a second one is a duplicate effect.

Then it optionally sleeps ``input["sleep"]`` seconds and returns the task id (deterministic).
Poison options in the task input: ``"raise": true`` always raises; ``"exit": true`` kills its own
process with ``os._exit(1)`` before touching the store.
"""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from pydantic import BaseModel, ConfigDict

from workers.base import Task, Worker

__all__ = ("EffectConfig", "EffectWorker", "idem_key", "open_store")

SCHEMA = """
CREATE TABLE IF NOT EXISTS executions (run_id TEXT NOT NULL, task_id TEXT NOT NULL, attempt INTEGER NOT NULL,
                                       pid INTEGER NOT NULL, t REAL NOT NULL);
CREATE TABLE IF NOT EXISTS effects (idem_key TEXT PRIMARY KEY, run_id TEXT NOT NULL, task_id TEXT NOT NULL,
                                    t REAL NOT NULL);
CREATE TABLE IF NOT EXISTS applied (idem_key TEXT NOT NULL, run_id TEXT NOT NULL, pid INTEGER NOT NULL,
                                    t REAL NOT NULL);
"""


def idem_key(run_id: str, task_id: str) -> str:
    """The idempotency key of a task's effect."""
    return f"{run_id}/{task_id}"


def open_store(path: str | Path) -> sqlite3.Connection:
    """A connection to the effects store (WAL, waits up to 30 s for a lock), schema created."""
    db = sqlite3.connect(path, timeout=30.0, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(SCHEMA)
    return db


class EffectConfig(BaseModel):
    """``store``: the SQLite file of the external effects."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    store: str


class EffectWorker(Worker):
    """Records each execution and applies one idempotent effect per task."""

    capability = "effect"
    config_model = EffectConfig

    async def handle(self, task: Task) -> Any:
        options = task.input if isinstance(task.input, dict) else {}
        if options.get("exit"):
            os._exit(1)
        if options.get("raise"):
            raise RuntimeError(f"poison task {task.task_id} always raises")
        await anyio.to_thread.run_sync(self._apply, task)
        if options.get("sleep"):
            await anyio.sleep(float(options["sleep"]))
        return task.task_id

    def _apply(self, task: Task) -> None:
        assert isinstance(self.config, EffectConfig)
        key, pid, now = idem_key(task.run_id, task.task_id), os.getpid(), time.time()
        db = open_store(self.config.store)
        try:
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO executions VALUES (?, ?, ?, ?, ?)", (task.run_id, task.task_id, task.attempt,
                                                                          pid, now))
            inserted = db.execute("INSERT OR IGNORE INTO effects VALUES (?, ?, ?, ?)",
                                  (key, task.run_id, task.task_id, now)).rowcount
            if inserted == 1:
                db.execute("INSERT INTO applied VALUES (?, ?, ?, ?)", (key, task.run_id, pid, now))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()
