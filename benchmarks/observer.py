"""The manager's metrics observer per event, against the prometheus_client calls it cannot avoid.

Run from the repository root (needs ``orchestrator[metrics]``)::

    python benchmarks/observer.py

The observer runs on the manager's hot path, once per event (three transitions per task). The
baseline, measured in the same run, is the prometheus_client work a transition needs written
the plain way: one labelled counter increment and two labelled gauge moves, each looking its
labels up (``.labels(...)``) every time. The observer caches its labelled children, so a ratio
below 1 is expected; prints medians of 5 repeats and the ratio.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import prometheus_client

from orchestrator.job import parse_job
from orchestrator.metrics import ManagerMetrics
from orchestrator.records import Event, RunRecord

N = 50_000


def per_call(fn: Any) -> float:
    started = time.perf_counter()
    for _ in range(N):
        fn()
    return (time.perf_counter() - started) / N


def main() -> None:
    registry = prometheus_client.CollectorRegistry()
    metrics = ManagerMetrics(registry)
    run = RunRecord.new(parse_job({"goal": "g", "tasks": [{"id": "t", "capability": "echo"}]}))
    task = run.tasks["t"]
    event: Any = Event.model_construct(seq=1, run_id=run.run_id, task_id="t", attempt=1, time=time.time(),
                                       kind="transition", event="retry", from_state="not_done",
                                       to_state="not_done", actor="w", detail={})
    metrics.observe(run, task, event)

    bare = prometheus_client.CollectorRegistry()
    counter = prometheus_client.Counter("t", "", ("event", "from", "to"), registry=bare)
    gauge = prometheus_client.Gauge("g", "", ("capability", "state"), registry=bare)

    def baseline() -> None:
        counter.labels("retry", "not_done", "not_done").inc()
        gauge.labels("echo", "not_done").dec()
        gauge.labels("echo", "not_done").inc()

    observer, bare_cost = [], []
    for rep in range(5):
        bare_cost.append(per_call(baseline))
        observer.append(per_call(lambda: metrics.observe(run, task, event)))
        print(f"  repeat {rep + 1}: baseline {bare_cost[-1] * 1e6:5.2f} us  observer {observer[-1] * 1e6:5.2f} us")
    b, o = statistics.median(bare_cost), statistics.median(observer)
    print(f"\nper transition event: baseline {b * 1e6:.2f} us, observer {o * 1e6:.2f} us, observer/baseline {o / b:.2f}")


if __name__ == "__main__":
    main()
