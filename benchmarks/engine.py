"""The run engine alone: what one run's start and its replies cost, with no bus, store or event loop.

Run from the repository root::

    python benchmarks/engine.py
    python benchmarks/engine.py --tasks 5000 --repeats 9

One job of ``--tasks`` independent tasks with a 300-byte input and a spec check (``expect``), as in
``lifecycle.py``: the time ``RunEngine.apply`` takes for the run's start (every task dispatched) and for
one ``done`` reply per task (done, verify, the spec check, pass), in microseconds a task. The manager
spends about a seventh of its time here in ``lifecycle.py``. The best of ``--repeats`` (the garbage
collector run before each), since what is measured is the code's cost, not the machine's hiccups.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from noop import noop_job

from orchestrator.engine import Instant, Reply, RunEngine, Start
from orchestrator.job import parse_job
from orchestrator.records import RunRecord
from protocol.messages import Done

INPUT = "x" * 300


def measure(n: int) -> tuple[float, float]:
    """Microseconds a task for the run's start and for its replies."""
    job = parse_job(noop_job(n, INPUT))
    run = RunRecord.new(job, "run-1", now=1_800_000_000.0)
    engine = RunEngine(run)
    at = Instant(1_800_000_000.0, 0.0)
    start = time.perf_counter()
    engine.apply(Start(at))
    started = time.perf_counter()
    replies = [Reply(f"t{i}", 1, "w1", "noop", Done(output=INPUT), at) for i in range(n)]
    begun = time.perf_counter()
    for reply in replies:
        engine.apply(reply)
    done = time.perf_counter()
    if any(task.state != "accepted" for task in run.tasks.values()):
        raise SystemExit("not every task was accepted: the benchmark measures the wrong path")
    return (started - start) / n * 1e6, (done - begun) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=5_000)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    results = []
    for _ in range(args.repeats):
        gc.collect()
        results.append(measure(args.tasks))
    start = min(r[0] for r in results)
    reply = min(r[1] for r in results)
    print(f"{args.tasks} tasks, best of {args.repeats}: start {start:.1f} us a task, reply {reply:.1f} us a task")


if __name__ == "__main__":
    main()
