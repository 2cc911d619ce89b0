"""What the shape of run ids costs the SQLite ledger: random ids against time-ordered ones, A/B in one process.

Run from the repository root::

    python benchmarks/ledger_ids.py [--runs 20000] [--rounds 3]

Each round writes the same workload into two fresh ledgers with the ledger's own schema, once with
random ids (``os.urandom(16).hex()``, what ids were before 2026-12-04) and once with ``new_id()``
(time first): group commits of 25 new one-task runs (a run row, a job row, a task row and two events
each) that also update the 50 runs before them (their run and task rows, two events each), rows the
sizes the peer race's one-task runs write (run 222 bytes, task 1,008, event 273). It prints the CPU
per run the writes took (SQLite works in the caller's thread here) and the ratio, median of rounds.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from orchestrator.ledger import _SCHEMA
from protocol.envelope import new_id

_RUN, _TASK, _EVENT, _JOB = "r" * 222, "t" * 1008, "e" * 273, "j" * 150
_UPSERT_RUN = ("INSERT INTO runs (run_id, state, created, job, record) VALUES (?, ?, ?, '', ?) "
               "ON CONFLICT(run_id) DO UPDATE SET state = excluded.state, record = excluded.record")


def _write(path: Path, make_id: Callable[[], str], runs: int, batch: int = 25) -> float:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.executescript(_SCHEMA)
    ids: list[str] = []
    seqs: dict[str, int] = {}
    started = time.process_time()
    for _ in range(runs // batch):
        new = [make_id() for _ in range(batch)]
        touched = new + ids[-2 * batch:]
        events = []
        for run_id in touched:
            for _ in range(2):
                seqs[run_id] = seq = seqs.get(run_id, 0) + 1
                events.append((run_id, seq, _EVENT))
        db.execute("BEGIN IMMEDIATE")
        db.executemany(_UPSERT_RUN, [(run_id, "running", 1.0, _RUN) for run_id in touched])
        db.executemany("INSERT OR IGNORE INTO jobs (run_id, job, task_order) VALUES (?, ?, ?)",
                       [(run_id, _JOB, '["t"]') for run_id in new])
        db.executemany("INSERT OR REPLACE INTO tasks (run_id, task_id, record) VALUES (?, ?, ?)",
                       [(run_id, "t", _TASK) for run_id in touched])
        db.executemany("INSERT OR IGNORE INTO events (run_id, seq, record) VALUES (?, ?, ?)", events)
        db.execute("COMMIT")
        ids.extend(new)
    spent = time.process_time() - started
    db.close()
    return spent / runs * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sides = {"random": lambda: os.urandom(16).hex(), "new_id": new_id}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, make_id in sides.items():
            with tempfile.TemporaryDirectory(prefix="ledger-ids-") as tmp:
                times[name].append(_write(Path(tmp) / "ledger.db", make_id, args.runs))
    ratio = statistics.median(o / r for o, r in zip(times["new_id"], times["random"], strict=True))
    print(f"{args.runs:,} runs, median of {args.rounds} rounds; µs of CPU per run for the ledger's writes")
    print(f"random ids {statistics.median(times['random']):6.0f}   time-ordered {statistics.median(times['new_id']):6.0f}"
          f"   ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
