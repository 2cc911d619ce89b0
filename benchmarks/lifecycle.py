"""The full task lifecycle over Redis, beside a raw Redis Streams request/reply loop measured in the same run.

Run from the repository root::

    python benchmarks/lifecycle.py                  # starts a throwaway redis-server on a free port
    python benchmarks/lifecycle.py --tasks 5000 --repeats 3

The manager (with its SQLite ledger, WAL + fsync) runs in this process; one worker process
(``WorkerRuntime`` with a no-op handler, concurrency 256) runs beside it, both on ``RedisBus``.

- lifecycle throughput: one job of ``--tasks`` independent tasks with a 300-byte input and a
  spec check (``expect``); time from submit to the run's end: assign, done, verify (spec check),
  accept, ledger commit, for every task;
- lifecycle latency: one-task jobs one after another; time from submit to ``accepted``;
- baseline: ``bus_raw.py``'s raw redis-py request/reply (pipelined throughput and one-at-a-time
  round trip) with the same payload, measured in the same run, and the ratios against it;
- where the job's CPU went: microseconds a task of the manager (this process, ledger thread
  included), the worker process and redis-server (when the benchmark started it) over the job.
  The process whose CPU a task is closest to the job's time a task is the bottleneck.

Figures are medians over ``--repeats`` runs. The process uses the manager process's garbage-collector
settings (``orchestrator/gctune.py``); ``BENCH_DEFAULT_GC=1`` keeps CPython's defaults instead. Nobody
follows the runs, so their histories are not mirrored to the bus; ``BENCH_MIRROR=all`` mirrors every one, as
managers did before 2026-12-04 (``ManagerSettings.mirror``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, cast

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bus_raw import PAYLOAD, _pct, _run_raw, _with_worker, print_medians
from noop import noop_job

from orchestrator.acknowledger import MIRRORS, Mirror
from orchestrator.job import parse_job
from orchestrator.ledger import SQLiteStore
from orchestrator.manager import Manager, ManagerSettings
from orchestrator.store import MemoryStore
from protocol.bus import BusSettings
from protocol.redis_bus import RedisBus

INPUT = PAYLOAD.decode()


def _worker(url: str, ns: str, ready: Any) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from noop import serve_on_redis

    serve_on_redis(url, ns, BusSettings(), ready, name="bench")


def _job(n: int) -> Any:
    return parse_job(noop_job(n, INPUT))


def _cpu_s(pid: int | None) -> float:
    """CPU seconds (user + system) of process ``pid`` so far; 0 when it is not known or not readable."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _mirror() -> Mirror:
    """``BENCH_MIRROR``: whose history the manager mirrors (followed, the default; all; off). Nobody follows here."""
    mirror = os.environ.get("BENCH_MIRROR", "followed")
    if mirror not in MIRRORS:
        raise SystemExit(f"BENCH_MIRROR={mirror!r}: expected one of {', '.join(MIRRORS)}")
    return cast(Mirror, mirror)


async def _lifecycle(url: str, n: int, lat_n: int, tmp: Path, mirror: Mirror,
                     redis_pid: int | None = None) -> tuple[float, list[float], dict[str, float]]:
    ns = f"bench{uuid.uuid4().hex[:8]}"
    proc = _with_worker(_worker, url, ns)
    try:
        async with RedisBus.from_url(url, settings=BusSettings(), namespace=ns) as bus, \
                SQLiteStore(tmp / f"{ns}.db") as store, anyio.create_task_group() as tg:
            manager = Manager(bus, store if not os.environ.get("BENCH_MEMORY_STORE") else MemoryStore(),
                              ManagerSettings(mirror=mirror, publish_events=not os.environ.get("BENCH_NO_EVENTS")))
            await tg.start(manager.serve)
            await manager.wait(await manager.submit(_job(20)))  # warm-up
            one = _job(1)
            latencies = []
            for _ in range(lat_n):
                start = time.perf_counter()
                await manager.wait(await manager.submit(one))
                latencies.append(time.perf_counter() - start)
            job = _job(n)
            cpu_before = (time.process_time(), _cpu_s(proc.pid), _cpu_s(redis_pid))
            start = time.perf_counter()
            run_id = await manager.submit(job)
            submitted = time.perf_counter() - start
            record = await manager.wait(run_id)
            elapsed = time.perf_counter() - start
            cpu_after = (time.process_time(), _cpu_s(proc.pid), _cpu_s(redis_pid))
            if os.environ.get("BENCH_VERBOSE"):
                print(f"    submit (dispatch of {n} tasks) took {submitted:.2f} s of {elapsed:.2f} s")
            assert record.state == "accepted", record.reason
            tg.cancel_scope.cancel()
    finally:
        proc.kill()
        proc.join(10)
    cpu = {name: (after - before) / n * 1e6 for name, before, after in zip(("manager", "worker", "redis"),
                                                                           cpu_before, cpu_after, strict=True)}
    if redis_pid is None:
        del cpu["redis"]
    return n / elapsed, latencies, cpu


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an existing Redis (default: start a throwaway redis-server)")
    parser.add_argument("--tasks", type=int, default=5_000)
    parser.add_argument("--latency-tasks", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    mirror = _mirror()  # a bad BENCH_MIRROR stops the benchmark before it starts anything
    from protocol.logging import configure_logging

    configure_logging("WARNING")
    if not os.environ.get("BENCH_DEFAULT_GC"):  # the manager process's settings (orchestrator/gctune.py)
        from orchestrator.gctune import tune_gc

        tune_gc()
    from tests._redis import given_or_throwaway

    tmp = Path(tempfile.mkdtemp(prefix="bench-ledger-"))
    rows: dict[str, dict[str, list[float]]] = {"raw": {}, "lifecycle": {}}
    cpu_rows: dict[str, list[float]] = {}
    with given_or_throwaway(args.url) as (url, server):
        redis_pid = server.proc.pid if server is not None and server.proc is not None else None
        print(f"redis at {url}; {args.tasks} tasks x {args.repeats} repeats; 300-byte payload")
        for rep in range(args.repeats):
            raw_tput, raw_lat, _ = await _run_raw(url, args.tasks, 500, args.latency_tasks)
            life_tput, life_lat, cpu = await _lifecycle(url, args.tasks, args.latency_tasks, tmp, mirror, redis_pid)
            for name, tput, lat in (("raw", raw_tput, raw_lat), ("lifecycle", life_tput, life_lat)):
                rows[name].setdefault("tput", []).append(tput)
                rows[name].setdefault("p50", []).append(_pct(lat, 0.50) * 1e6)
                rows[name].setdefault("p99", []).append(_pct(lat, 0.99) * 1e6)
                print(f"  repeat {rep + 1} {name:9}: {tput:8.0f} tasks/s  p50 {rows[name]['p50'][-1]:7.0f} us  "
                      f"p99 {rows[name]['p99'][-1]:7.0f} us")
            for name, us in cpu.items():
                cpu_rows.setdefault(name, []).append(us)
            print(f"  repeat {rep + 1} job CPU  : " + "  ".join(f"{name} {us:4.0f}" for name, us in cpu.items())
                  + f" us/task; the job took {1e6 / life_tput:4.0f} us/task")
    print_medians(rows, baseline="raw", measured="lifecycle")
    print("job CPU, medians: " + "  ".join(f"{name} {statistics.median(us):.0f}" for name, us in cpu_rows.items())
          + " us/task")


if __name__ == "__main__":
    anyio.run(main)
