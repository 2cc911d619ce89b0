"""The framework embedded in one process on its defaults, beside the same work on plain asyncio measured in the same run.

Run from the repository root::

    python benchmarks/embedded.py
    python benchmarks/embedded.py --tasks 5000 --repeats 3

What a user gets from ``Orchestrator(workers=[...])`` with no bus and no store given: the ``MemoryBus``,
the ``MemoryStore`` and the worker runtime in this process, no Redis, no signatures.

- embedded throughput: one job of ``--tasks`` independent tasks, each a no-op worker's echo of a 300-byte input
  with a spec check (``expect``), from submit to the run's end (``accepted``);
- embedded latency: one-task jobs one after another, from submit to ``accepted``;
- baseline: the same work with none of the framework: a queue, ``--concurrency`` consumer tasks calling the
  same no-op handler, a future per task, and the caller comparing each output with what it expected.

Figures are medians over ``--repeats`` runs; the last line is the framework's cost over the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bus_raw import PAYLOAD, _pct, print_medians
from noop import NoopWorker, noop_job

from orchestrator.api import Orchestrator
from workers import Task

INPUT = PAYLOAD.decode()


RunJob = Callable[[dict[str, Any]], Awaitable[str | None]]  # runs a job: None once accepted, else why not


async def _measure(run: RunJob, n: int, lat_n: int) -> tuple[float, list[float], float]:
    """Tasks a second of one ``n``-task job, one-task latencies, and this process's CPU a task over the job."""
    failed = await run(noop_job(20, INPUT))  # warm-up
    assert failed is None, failed
    one, latencies = noop_job(1, INPUT), []
    for _ in range(lat_n):
        start = time.perf_counter()
        failed = await run(one)
        latencies.append(time.perf_counter() - start)
        assert failed is None, failed
    job = noop_job(n, INPUT)
    cpu, start = time.process_time(), time.perf_counter()
    failed = await run(job)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    assert failed is None, failed
    return n / elapsed, latencies, cpu / n * 1e6


async def _embedded(n: int, lat_n: int, concurrency: int) -> tuple[float, list[float], float]:
    """``_measure`` of ``Orchestrator`` on its embedded defaults."""
    async with Orchestrator(workers=[NoopWorker()], concurrency=concurrency) as orch:
        async def run(job: dict[str, Any]) -> str | None:
            result = await orch.run(job)
            return None if result.accepted else result.reason

        return await _measure(run, n, lat_n)


async def _plain(n: int, lat_n: int, concurrency: int) -> tuple[float, list[float], float]:
    """``_measure`` of a queue and a future a task in place of the framework."""
    handler = NoopWorker()
    queue: asyncio.Queue[tuple[Task, asyncio.Future[Any]]] = asyncio.Queue()

    async def consume() -> None:
        while True:
            task, future = await queue.get()
            future.set_result(await handler.handle(task))

    async def run(job: dict[str, Any]) -> str | None:
        loop = asyncio.get_running_loop()
        waiting = []
        for t in job["tasks"]:
            future = loop.create_future()
            queue.put_nowait((Task(run_id="plain", task_id=t["id"], attempt=1, capability=t["capability"],
                                  instruction="", input=t["input"]), future))
            waiting.append((t["spec"]["expect"], future))
        return None if all([await future == expected for expected, future in waiting]) else "an output differed"

    consumers = [asyncio.ensure_future(consume()) for _ in range(concurrency)]
    try:
        return await _measure(run, n, lat_n)
    finally:
        for consumer in consumers:
            consumer.cancel()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=5_000)
    parser.add_argument("--latency-tasks", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=256, help="worker concurrency (and plain consumers)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from protocol.logging import configure_logging

    configure_logging("WARNING")
    from orchestrator.gctune import tune_gc

    tune_gc()  # what `orchestrator run` does; an embedding application keeps its own settings
    print(f"{args.tasks} tasks x {args.repeats} repeats; 300-byte payload; concurrency {args.concurrency}")
    rows: dict[str, dict[str, list[float]]] = {"plain": {}, "embedded": {}}
    cpu: dict[str, list[float]] = {"plain": [], "embedded": []}
    for rep in range(args.repeats):
        for name, measure in (("plain", _plain), ("embedded", _embedded)):
            tput, lat, us = await measure(args.tasks, args.latency_tasks, args.concurrency)
            row = rows[name]
            row.setdefault("tput", []).append(tput)
            row.setdefault("p50", []).append(_pct(lat, 0.50) * 1e6)
            row.setdefault("p99", []).append(_pct(lat, 0.99) * 1e6)
            cpu[name].append(us)
            print(f"  repeat {rep + 1} {name:8}: {tput:8.0f} tasks/s  p50 {row['p50'][-1]:7.0f} us  "
                  f"p99 {row['p99'][-1]:7.0f} us  CPU {us:5.0f} us/task")
    print_medians(rows, baseline="plain", measured="embedded")
    print("CPU a task of the job, medians: " + "  ".join(f"{name} {statistics.median(us):.0f}"
                                                         for name, us in cpu.items()) + " us")


if __name__ == "__main__":
    anyio.run(main)
