"""The fault tests' checker: what a run lost, duplicated or re-applied, from three sources of truth.

- the manager's final status of the run (``orchestrator status --json`` / ``processes.fetch_status``);
- the ledger's event history (read-only, so it can run while a manager still holds the file);
- the external effects store written by :mod:`tests.integration.effects`.

One line per run::

    checker: submitted=N accepted=N lost=N duplicated_results=N duplicate_effects=N recovery_s=X.X

- ``lost`` = submitted - accepted (final status);
- ``duplicated_results`` = tasks with more than one ``pass`` transition in the ledger (accepted twice);
- ``duplicate_effects`` = idempotency keys whose effect was actually applied more than once;
- ``recovery_s`` = for each injected fault, the time from the fault until the work it hit was
  accepted again, the worst over all faults (0.0 when no fault was injected). A fault that hit a
  worker process (given with its pid) hit the tasks that process had started and that were not
  accepted yet at the time of the fault: recovery is the time to the last of their ``pass`` events.
  Any other fault (manager, Redis) hit the whole run: recovery is the longest stretch without any
  task accepted between the fault and the run's end (the stall it caused; in a fault-free run of
  these tests no stretch is longer than a few tenths of a second).

Also reported, not judged: ``executions`` (handler runs, re-execution included) and ``ledger_accepted``
(tasks with a ``pass`` event), which must equal ``accepted``.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.records import Event
from protocol.history import RunFinished
from tests._history import transitions

__all__ = ("CheckResult", "check_run", "ledger_events")


@dataclass(frozen=True)
class CheckResult:
    submitted: int
    accepted: int
    duplicated_results: int
    duplicate_effects: int
    recovery_s: float
    executions: int
    ledger_accepted: int

    @property
    def lost(self) -> int:
        return self.submitted - self.accepted

    @property
    def passed(self) -> bool:
        return self.lost == 0 and self.duplicated_results == 0 and self.duplicate_effects == 0 \
            and self.ledger_accepted == self.accepted

    def line(self) -> str:
        return (f"checker: submitted={self.submitted} accepted={self.accepted} lost={self.lost} "
                f"duplicated_results={self.duplicated_results} duplicate_effects={self.duplicate_effects} "
                f"recovery_s={self.recovery_s:.1f} executions={self.executions} "
                f"ledger_accepted={self.ledger_accepted}")


def _read_only(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30.0)


def ledger_events(ledger: Path, run_id: str) -> list[Event]:
    """The run's history as the ledger holds it (what ``SQLiteStore(path).events(run_id)`` returns)."""
    db = _read_only(ledger)
    try:
        rows = db.execute("SELECT record FROM events WHERE run_id = ? ORDER BY seq", (run_id,)).fetchall()
    finally:
        db.close()
    return [Event.model_validate_json(r[0]) for r in rows]


Fault = tuple[float, int | None]  # (wall-clock time, pid of the worker it hit or None)


def check_run(status: dict[str, Any], *, ledger: Path, store: Path, submitted: int,
              faults: list[Fault] = ()) -> CheckResult:  # type: ignore[assignment]
    """Check one finished run; ``faults`` are when faults were injected, and which worker each hit."""
    run_id = status["run_id"]
    accepted = sum(1 for t in status["tasks"] if t["state"] == "accepted")
    events = ledger_events(ledger, run_id)
    passes = Counter(e.task_id for e in transitions(events, "pass"))
    pass_times = sorted(e.time for e in transitions(events, "pass"))
    end = next((e.time for e in events if isinstance(e.body, RunFinished)), None)
    passed_at = {e.task_id: e.time for e in transitions(events, "pass")}
    db = _read_only(store)
    try:
        recovery = 0.0
        for fault, pid in faults:
            if pid is None:
                points = [fault, *(t for t in pass_times if t >= fault)]
                if end is not None:
                    points.append(end)
                gap = max((b - a for a, b in itertools.pairwise(points)), default=0.0)
                after = fault + gap
            else:
                hit = {r[0] for r in db.execute("SELECT task_id FROM executions WHERE run_id = ? AND pid = ? "
                                                "AND t <= ?", (run_id, pid, fault))}
                late = [passed_at.get(task_id, end or fault) for task_id in hit]
                after = max((t for t in late if t >= fault), default=fault)
            if after is not None:
                recovery = max(recovery, after - fault)
        applied = db.execute("SELECT COUNT(*) FROM (SELECT idem_key FROM applied WHERE run_id = ? "
                             "GROUP BY idem_key HAVING COUNT(*) > 1)", (run_id,)).fetchone()[0]
        executions = db.execute("SELECT COUNT(*) FROM executions WHERE run_id = ?", (run_id,)).fetchone()[0]
    finally:
        db.close()
    return CheckResult(submitted=submitted, accepted=accepted, duplicated_results=sum(1 for n in passes.values()
                                                                                        if n > 1),
                       duplicate_effects=int(applied), recovery_s=recovery, executions=int(executions),
                       ledger_accepted=len(passes))


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.integration.checker STATUS.json LEDGER STORE``: print the line, exit 0 when it passes."""
    import sys

    args = sys.argv[1:] if argv is None else argv
    status = json.loads(Path(args[0]).read_text())
    result = check_run(status, ledger=Path(args[1]), store=Path(args[2]), submitted=len(status["tasks"]))
    print(result.line())
    return 0 if result.passed else 1


if __name__ == "__main__":
    raise SystemExit(main())
