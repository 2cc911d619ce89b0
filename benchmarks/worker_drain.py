"""The worker runtime's own cost: drain a stream of waiting assigns, beside a raw redis-py loop doing the same.

Run from the repository root::

    python benchmarks/worker_drain.py                  # starts a throwaway redis-server on a free port
    python benchmarks/worker_drain.py --tasks 20000 --repeats 5

Each repeat fills a task stream with ``--tasks`` assigns (300-byte input) first, then times how long
the consumer takes to turn all of them into replies, and its CPU per task (``time.thread_time`` of
the event loop's thread: the consumer runs in this process, nothing else does meanwhile):

- raw: redis-py, ``XREADGROUP COUNT 100``, then one pipeline per batch with an ``XADD`` of each
  reply, ``XACK`` and ``XDEL``: the floor for a Streams worker in Python;
- runtime: ``WorkerRuntime`` (concurrency 256) with a no-op handler on ``RedisBus``: decode and
  validation of each assign, a lease, the handler call under its time limit, the reply envelope,
  and the fenced commit of reply and acknowledgement.

The collector is tuned as in the worker process (``orchestrator/gctune.py``; ``BENCH_DEFAULT_GC=1``: Python's
defaults). No signatures (``--signed`` adds them: assigns signed as the manager, replies MAC'd for it). Figures
are medians over ``--repeats``, interleaved raw/runtime so drift hits both alike.
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

import anyio
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bus_raw import PAYLOAD, _settings
from noop import NoopWorker

from protocol.envelope import Envelope
from protocol.keys import tasks_stream
from protocol.messages import Assign
from protocol.redis_bus import RedisBus
from workers.runtime import RuntimeSettings, WorkerRuntime

INPUT = PAYLOAD.decode()


async def _raw(url: str, n: int) -> tuple[float, float]:
    ns = f"drain{uuid.uuid4().hex[:8]}"
    tasks, results = f"{ns}:tasks", f"{ns}:results"
    async with aioredis.Redis.from_url(url) as r:
        await r.xgroup_create(tasks, "workers", id="0", mkstream=True)
        for i in range(0, n, 500):
            pipe = r.pipeline(transaction=False)
            for _ in range(min(500, n - i)):
                pipe.xadd(tasks, {b"f": PAYLOAD})
            await pipe.execute()
        done = 0
        start, cpu = time.perf_counter(), time.thread_time()
        while done < n:
            reply = await r.xreadgroup("workers", "w1", {tasks: ">"}, count=100, block=1000)
            entries = reply[0][1]
            pipe = r.pipeline(transaction=False)
            for _, fields in entries:
                pipe.xadd(results, {b"f": fields[b"f"]})
            ids = [e[0] for e in entries]
            pipe.xack(tasks, "workers", *ids)
            pipe.xdel(tasks, *ids)
            await pipe.execute()
            done += len(entries)
        return n / (time.perf_counter() - start), (time.thread_time() - cpu) / n


async def _runtime(url: str, n: int, keys: str | None) -> tuple[float, float]:
    ns = f"drain{uuid.uuid4().hex[:8]}"
    manager, worker = _settings(keys, "manager"), _settings(keys, "worker:noop")
    async with RedisBus.from_url(url, namespace=ns, settings=manager) as sender:
        for i in range(0, n, 500):
            await sender.publish_many(tasks_stream("noop"), [
                Envelope(run_id="r", task_id=f"t{j}", attempt=1, body=Assign(capability="noop", instruction="noop",
                                                                           input=INPUT))
                for j in range(i, min(n, i + 500))])
    finished = _Finished(n)
    async with RedisBus.from_url(url, namespace=ns, settings=worker) as bus:
        runtime = WorkerRuntime(bus, {"noop": NoopWorker()}, RuntimeSettings(concurrency=256, name="drain"),
                                observers=[finished])
        start, cpu = time.perf_counter(), time.thread_time()
        async with runtime.running():
            await finished.all.wait()
            elapsed, used = time.perf_counter() - start, time.thread_time() - cpu
    return n / elapsed, used / n


class _Finished:
    """A runtime observer that says when ``n`` handlers have ended."""

    def __init__(self, n: int) -> None:
        self.left = n
        self.all = anyio.Event()

    def handler_started(self, capability: str, envelope: Envelope) -> None:
        pass

    def handler_finished(self, capability: str, envelope: Envelope, outcome: str, duration_s: float) -> None:
        self.left -= 1
        if self.left == 0:
            self.all.set()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an existing Redis (default: start a throwaway redis-server)")
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--signed", action="store_true", help="assigns signed as the manager, replies MAC'd")
    args = parser.parse_args()
    from protocol.logging import configure_logging

    configure_logging("WARNING")
    if not os.environ.get("BENCH_DEFAULT_GC"):  # the worker process's settings (orchestrator/gctune.py)
        from orchestrator.gctune import WORKER_THRESHOLDS, tune_gc

        tune_gc(WORKER_THRESHOLDS)
    keys = None
    if args.signed:
        from protocol.keyring import Keyring

        ring = Keyring.init(tempfile.mkdtemp(prefix="drain-keys-"))
        ring.add("worker", "noop")
        keys = str(ring.path)
    from tests._redis import given_or_throwaway

    rows: dict[str, list[tuple[float, float]]] = {"raw": [], "runtime": []}
    with given_or_throwaway(args.url) as (url, _):
        print(f"redis at {url}; {args.tasks} waiting tasks x {args.repeats} repeats; "
              f"{'signed' if keys else 'unsigned'}")
        for rep in range(args.repeats):
            rows["raw"].append(await _raw(url, args.tasks))
            rows["runtime"].append(await _runtime(url, args.tasks, keys))
            for name in rows:
                tput, cpu = rows[name][-1]
                print(f"  repeat {rep + 1} {name:8}: {tput:8.0f} tasks/s  {cpu * 1e6:6.1f} us CPU/task")
    med = {name: (statistics.median(t for t, _ in v), statistics.median(c for _, c in v)) for name, v in rows.items()}
    print(f"\n{'':16}{'tasks/s':>10}{'us CPU/task':>14}")
    for name, (tput, cpu) in med.items():
        print(f"{name:16}{tput:10.0f}{cpu * 1e6:14.1f}")
    print(f"{'runtime/raw':16}{med['runtime'][0] / med['raw'][0]:10.2f}{med['runtime'][1] / med['raw'][1]:14.2f}")


if __name__ == "__main__":
    anyio.run(main)
