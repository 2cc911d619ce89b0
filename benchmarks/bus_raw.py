"""Request/reply over Redis Streams: a raw redis-py baseline against the same workload through RedisBus.

Run from the repository root::

    python benchmarks/bus_raw.py                 # starts a throwaway redis-server on a free port
    python benchmarks/bus_raw.py --url redis://127.0.0.1:6380/0 --tasks 20000 --repeats 3

Each measurement has the requester in this process and one worker in a separate process:

- throughput: the requester keeps ``--window`` requests in flight and counts completed replies
  per second (raw: pipelined XADD batches, XREADGROUP COUNT, pipelined reply XADD + XACK;
  bus: ``publish`` from concurrent senders -> ``consume`` -> ``commit`` -> manager ``consume`` -> ``ack``);
- round trip: one request at a time, from send until the reply is read; p50 and p99, and the
  requester's CPU time per round trip (``time.process_time()``), which shows how much of the
  latency is Python work rather than waiting.

The ``signed`` row is the same bus with signing on (the default for processes on Redis): every
assign signed by its sender's Ed25519 key and verified by its receiver, every reply MAC'd for the
manager (``ORCH_SIGN_REPLIES=1``: signed too, as before 2026-12-03).

Figures are medians over ``--repeats`` runs. A fresh key namespace is used for every run.
``BUS_BENCH_NO_HIREDIS=1`` hides hiredis, to measure redis-py's pure-Python parser.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

if os.environ.get("BUS_BENCH_NO_HIREDIS"):
    sys.modules["hiredis"] = None  # type: ignore[assignment]  # makes redis-py fall back to its own parser

# Imports below follow the optional hiredis switch and the sys.path fix on purpose.
import anyio
import anyio.abc
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol.bus import BusSettings
from protocol.envelope import Envelope
from protocol.messages import Assign, Done
from protocol.redis_bus import RedisBus

PAYLOAD = b"x" * 300


# -- raw redis-py ----------------------------------------------------------------------------------

def _raw_worker(url: str, ns: str, ready: Any) -> None:
    async def main() -> None:
        r = aioredis.Redis.from_url(url)
        tasks, results = f"{ns}:{{cap.raw}}:tasks", f"{ns}:{{cap.raw}}:results"
        await r.xgroup_create(tasks, "workers", id="0", mkstream=True)
        ready.set()
        while True:
            reply = await r.xreadgroup("workers", "w1", {tasks: ">"}, count=100, block=1000)
            if not reply:
                continue
            entries = reply[0][1]
            pipe = r.pipeline(transaction=False)
            for _, fields in entries:
                if fields[b"f"] == b"stop":
                    return
                pipe.xadd(results, {b"f": fields[b"f"]})
            pipe.xack(tasks, "workers", *[e[0] for e in entries])
            pipe.xdel(tasks, *[e[0] for e in entries])
            await pipe.execute()

    anyio.run(main)


async def _raw_throughput(r: aioredis.Redis, ns: str, n: int, window: int) -> float:
    tasks, results = f"{ns}:{{cap.raw}}:tasks", f"{ns}:{{cap.raw}}:results"
    done = 0
    sent = 0
    start = time.perf_counter()
    while done < n:
        batch = min(100, n - sent, window - (sent - done))
        if batch > 0:
            pipe = r.pipeline(transaction=False)
            for _ in range(batch):
                pipe.xadd(tasks, {b"f": PAYLOAD})
            await pipe.execute()
            sent += batch
        reply = await r.xreadgroup("manager", "m1", {results: ">"}, count=500, block=1000)
        if reply:
            ids = [e[0] for e in reply[0][1]]
            pipe = r.pipeline(transaction=False)
            pipe.xack(results, "manager", *ids)
            pipe.xdel(results, *ids)
            await pipe.execute()
            done += len(ids)
    return n / (time.perf_counter() - start)


async def _raw_latency(r: aioredis.Redis, ns: str, n: int) -> list[float]:
    tasks, results = f"{ns}:{{cap.raw}}:tasks", f"{ns}:{{cap.raw}}:results"
    out: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        await r.xadd(tasks, {b"f": PAYLOAD})
        reply = await r.xreadgroup("manager", "m1", {results: ">"}, count=1, block=5000)
        await r.xack(results, "manager", reply[0][1][0][0])
        out.append(time.perf_counter() - t0)
    return out


# -- RedisBus --------------------------------------------------------------------------------------

def _settings(keys: str | None, signer: str) -> BusSettings:
    """Plain settings, or settings whose codec signs as ``signer`` with the keyring at ``keys``."""
    if keys is None:
        return BusSettings()
    from orchestrator.trust import sign_replies_from_env
    from protocol.codec import Codec
    from protocol.keyring import Keyring

    return BusSettings(codec=Codec(keyring=Keyring.load(keys), signers=(signer,),
                                   reply_macs=not sign_replies_from_env()))


def _keyring() -> str:
    from protocol.keyring import Keyring

    path = Path(tempfile.mkdtemp(prefix="bench-keys-"))
    Keyring.init(path).add("worker", "bench")
    return str(path)


def _bus_worker(url: str, ns: str, ready: Any, keys: str | None = None) -> None:
    async def main() -> None:
        async with RedisBus.from_url(url, settings=_settings(keys, "worker:bench"), namespace=ns) as bus:
            it = bus.consume("tasks.bench", group="workers", consumer="w1")
            ready.set()
            async with anyio.create_task_group() as tg:
                async for d in it:
                    if d.envelope.body.instruction == "stop":  # type: ignore[union-attr]
                        tg.cancel_scope.cancel()
                        await bus.ack(d)
                        return
                    tg.start_soon(bus.commit, d, "results.bench", d.envelope.reply(Done(output=None), sender="w1"))

    anyio.run(main)


def _task(i: int, instruction: str | None = None) -> Envelope:
    body = Assign(capability="bench", instruction=instruction or "x" * 190)
    return Envelope(run_id="bench", task_id=f"t{i}", attempt=1, body=body)


async def _bus_throughput(bus: RedisBus, n: int, window: int) -> float:
    results = bus.consume("results.bench", group="manager", consumer="m1")
    limiter = anyio.Semaphore(window)
    done = 0
    start = time.perf_counter()

    async def send(tg: anyio.abc.TaskGroup) -> None:
        for i in range(n):
            await limiter.acquire()
            tg.start_soon(bus.publish, "tasks.bench", _task(i))  # concurrent publishes share pipelines

    async with anyio.create_task_group() as tg:
        tg.start_soon(send, tg)
        async for d in results:
            tg.start_soon(bus.ack, d)
            limiter.release()
            done += 1
            if done == n:
                break
        elapsed = time.perf_counter() - start
        tg.cancel_scope.cancel()
    return n / elapsed


async def _bus_latency(bus: RedisBus, n: int) -> list[float]:
    results = bus.consume("results.bench", group="manager", consumer="m1")
    out: list[float] = []
    for i in range(n):
        t0 = time.perf_counter()
        await bus.publish("tasks.bench", _task(i))
        d = await anext(results)
        await bus.ack(d)
        out.append(time.perf_counter() - t0)
    return out


# -- harness ---------------------------------------------------------------------------------------

def _with_worker(target: Callable[..., None], url: str, ns: str, *extra: Any) -> mp.process.BaseProcess:
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=target, args=(url, ns, ready, *extra), daemon=True)
    proc.start()
    if not ready.wait(30):
        raise RuntimeError("worker did not start")
    return proc


async def _run_raw(url: str, n: int, window: int, lat_n: int) -> tuple[float, list[float], float]:
    """Throughput, round-trip latencies, and the requester's CPU seconds per round trip."""
    ns = f"bench{uuid.uuid4().hex[:8]}"
    proc = _with_worker(_raw_worker, url, ns)
    r = aioredis.Redis.from_url(url)
    await r.xgroup_create(f"{ns}:{{cap.raw}}:results", "manager", id="0", mkstream=True)
    try:
        await _raw_latency(r, ns, 50)  # warm-up
        tput = await _raw_throughput(r, ns, n, window)
        cpu = time.process_time()
        lat = await _raw_latency(r, ns, lat_n)
        cpu = (time.process_time() - cpu) / lat_n
        await r.xadd(f"{ns}:{{cap.raw}}:tasks", {b"f": b"stop"})
    finally:
        await r.aclose()
    proc.join(10)
    return tput, lat, cpu


async def _run_bus(url: str, n: int, window: int, lat_n: int,
                   keys: str | None = None) -> tuple[float, list[float], float]:
    """Throughput, round-trip latencies, and the requester's CPU seconds per round trip."""
    ns = f"bench{uuid.uuid4().hex[:8]}"
    proc = _with_worker(_bus_worker, url, ns, keys)
    async with RedisBus.from_url(url, settings=_settings(keys, "manager"), namespace=ns) as bus:
        await _bus_latency(bus, 50)  # warm-up
        tput = await _bus_throughput(bus, n, window)
        cpu = time.process_time()
        lat = await _bus_latency(bus, lat_n)
        cpu = (time.process_time() - cpu) / lat_n
        await bus.publish("tasks.bench", _task(-1, "stop"))
    proc.join(10)
    return tput, lat, cpu


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an existing Redis to use (default: start a throwaway redis-server)")
    parser.add_argument("--tasks", type=int, default=20_000)
    parser.add_argument("--window", type=int, default=500, help="requests in flight in the throughput run")
    parser.add_argument("--latency-tasks", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from tests._redis import given_or_throwaway

    with given_or_throwaway(args.url) as (url, _):
        await _report(url, args)


async def _report(url: str, args: argparse.Namespace) -> None:
    from redis.utils import HIREDIS_AVAILABLE

    parser_name = "hiredis" if HIREDIS_AVAILABLE else "pure-Python parser"
    print(f"redis at {url}; {args.tasks} tasks x {args.repeats} repeats; window {args.window}; {parser_name}")
    rows: dict[str, dict[str, list[float]]] = {"raw": {}, "bus": {}, "signed": {}}
    keys = _keyring()
    signed = functools.partial(_run_bus, keys=keys)
    for rep in range(args.repeats):
        for name, run in (("raw", _run_raw), ("bus", _run_bus), ("signed", signed)):
            tput, lat, cpu = await run(url, args.tasks, args.window, args.latency_tasks)
            row = rows[name]
            row.setdefault("cpu", []).append(cpu * 1e6)
            row.setdefault("tput", []).append(tput)
            row.setdefault("p50", []).append(_pct(lat, 0.50) * 1e6)
            row.setdefault("p99", []).append(_pct(lat, 0.99) * 1e6)
            print(f"  repeat {rep + 1} {name}: {tput:8.0f} tasks/s  p50 {row['p50'][-1]:6.0f} us  "
                  f"p99 {row['p99'][-1]:6.0f} us  requester CPU {row['cpu'][-1]:4.0f} us/round trip")
    print_medians(rows, baseline="raw", measured="bus")
    print_medians(rows, baseline="bus", measured="signed")
    raw_cpu, bus_cpu, signed_cpu = (statistics.median(rows[name]["cpu"]) for name in ("raw", "bus", "signed"))
    print(f"requester CPU per round trip: raw {raw_cpu:.0f} us, bus {bus_cpu:.0f} us ({bus_cpu / raw_cpu:.2f}x), "
          f"signed {signed_cpu:.0f} us ({signed_cpu / raw_cpu:.2f}x)")


def print_medians(rows: dict[str, dict[str, list[float]]], *, baseline: str, measured: str) -> None:
    """The medians of each row, and the measured row as ratios of the baseline measured in the same run."""
    med = {name: {k: statistics.median(v) for k, v in row.items()} for name, row in rows.items()}
    width = max(16, len(measured) + len(baseline) + 2)
    print()
    print(f"{'':{width}}{'tasks/s':>10}{'p50 us':>10}{'p99 us':>10}")
    for name in (baseline, measured):
        m = med[name]
        print(f"{name:{width}}{m['tput']:10.0f}{m['p50']:10.0f}{m['p99']:10.0f}")
    r, b = med[baseline], med[measured]
    # Three significant digits: the embedded benchmark's throughput ratio is a few hundredths.
    print(f"{measured + '/' + baseline:{width}}{b['tput'] / r['tput']:10.3g}{b['p50'] / r['p50']:10.3g}"
          f"{b['p99'] / r['p99']:10.3g}")


if __name__ == "__main__":
    anyio.run(main)
