"""Where one request/reply round trip's time goes, stage by stage, signed and unsigned.

Run from the repository root::

    python benchmarks/roundtrip_stages.py                   # starts a throwaway redis-server on a free port
    python benchmarks/roundtrip_stages.py --round-trips 3000 --repeats 3

The requester (this process) publishes one ``Assign`` at a time with ``RedisBus.publish`` and reads
the reply from ``results.noop``; one worker process runs the real ``WorkerRuntime`` with a no-op
handler. Both processes stamp each stage with ``time.perf_counter_ns()`` (the system's monotonic
clock, the same in both processes), and each round trip's stamps are matched by time: every round
trip is alone on the bus. Stages:

- requester: build, encode and sign the assign, up to writing it to Redis;
- Redis, and the worker waking up: from that write until the worker's blocking read returns;
- worker: decode and check the assign (its Ed25519 signature on a signed bus);
- worker: hand the delivery to a runner, run the handler, build the reply;
- worker: encode the reply (with its MAC) up to writing the commit to Redis;
- Redis, and the requester waking up: from the commit's write until its blocking read returns;
- requester: decode and check the reply, and hand it over.

Beside each CPU stage, the same work measured hot (the same calls back to back in one process)
and the ratio of the two: in a sequential round trip every process wakes from sleep for every
stage, with cold caches, and that, not the hot cost, is what the latency pays.

The stamps come from wrappers around internal functions (``RedisBus._decode``,
``WorkerRuntime._handle``, ``protocol.redis_bus._roundtrip``): this is a diagnostic for the people
working on the hot path, tied to those names (``tests/protocol/test_roundtrip_stages.py`` runs it
small, so a rename shows at once). The wrappers cost a few microseconds a stage.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bus_raw import PAYLOAD, _settings

from protocol.envelope import Envelope
from protocol.messages import Assign, Done
from protocol.redis_bus import RedisBus
from workers import Task

INPUT = PAYLOAD.decode()
STAGES = (
    ("requester: build, encode, sign the assign", "start", "publish_write"),
    ("Redis + worker wakes up", "publish_write", "worker_read"),
    ("worker: parse the read", "worker_read", "decode_start"),
    ("worker: decode + check the assign", "decode_start", "decode_end"),
    ("worker: hand to a runner", "decode_end", "handle_start"),
    ("worker: handler + reply envelope", "handle_start", "handle_end"),
    ("worker: encode reply, write commit", "handle_end", "commit_write"),
    ("Redis + requester wakes up", "commit_write", "reply_read"),
    ("requester: parse the read", "reply_read", "reply_decode_start"),
    ("requester: decode + check the reply", "reply_decode_start", "reply_decode_end"),
    ("requester: hand the reply over", "reply_decode_end", "end"),
)


class Stamps:
    """``(name, ns)`` pairs, appended by the wrappers below."""

    def __init__(self) -> None:
        self.items: list[tuple[str, int]] = []

    def mark(self, name: str) -> None:
        self.items.append((name, time.perf_counter_ns()))


def _instrument(stamps: Stamps, *, worker: bool) -> Callable[[], None]:
    """Wrap the internal functions each stage starts or ends in (see the module docstring); returns the undo."""
    from protocol import redis_bus
    from workers.runtime import WorkerRuntime

    roundtrip, decode, handle = redis_bus._roundtrip, RedisBus._decode, WorkerRuntime._handle

    def undo() -> None:
        redis_bus._roundtrip = roundtrip  # type: ignore[assignment]
        RedisBus._decode = decode  # type: ignore[method-assign]
        WorkerRuntime._handle = handle  # type: ignore[method-assign]

    async def timed_roundtrip(conn: Any, commands: Any, deadlines: Any) -> Any:
        first = commands[0][0]
        if first == "EVALSHA":
            stamps.mark("commit_write" if worker else "publish_write")
        replies = await roundtrip(conn, commands, deadlines)
        if first == "XREADGROUP" and replies[0]:
            stamps.mark("worker_read" if worker else "reply_read")
        return replies

    redis_bus._roundtrip = timed_roundtrip  # type: ignore[assignment]

    async def timed_decode(self: RedisBus, *args: Any) -> Any:
        stamps.mark("decode_start" if worker else "reply_decode_start")
        try:
            return await decode(self, *args)
        finally:
            stamps.mark("decode_end" if worker else "reply_decode_end")

    RedisBus._decode = timed_decode  # type: ignore[method-assign]
    if worker:
        async def timed_handle(self: WorkerRuntime, *args: Any) -> Any:
            stamps.mark("handle_start")
            try:
                return await handle(self, *args)
            finally:
                stamps.mark("handle_end")

        WorkerRuntime._handle = timed_handle  # type: ignore[method-assign,assignment]
    return undo


def _worker(url: str, ns: str, ready: Any, keys: str | None, stamps_out: Connection) -> None:
    from noop import serve_on_redis

    stamps = Stamps()
    _instrument(stamps, worker=True)

    def serve_stamps() -> None:  # the requester asks for them (and clears them) between phases
        while True:
            stamps_out.recv()
            taken, stamps.items = stamps.items, []
            stamps_out.send(taken)

    threading.Thread(target=serve_stamps, daemon=True).start()
    serve_on_redis(url, ns, _settings(keys, "worker:noop"), ready, name="stages")


def _assign(i: int) -> Envelope:
    return Envelope(run_id="stages", task_id=f"t{i}", attempt=1,
                    body=Assign(capability="noop", instruction="noop", input=INPUT))


async def _round_trips(url: str, n: int, keys: str | None) -> tuple[list[dict[str, int]], list[float]]:
    """Per round trip, each stage's first stamp inside it (both processes); and the round trips' seconds."""
    ns = f"stages{uuid.uuid4().hex[:8]}"
    ctx = mp.get_context("spawn")
    ready, (mine, theirs) = ctx.Event(), ctx.Pipe()
    proc = ctx.Process(target=_worker, args=(url, ns, ready, keys, theirs), daemon=True)
    proc.start()
    if not ready.wait(30):
        raise RuntimeError("worker did not start")
    stamps = Stamps()
    windows: list[tuple[int, int]] = []
    undo: Callable[[], None] | None = None
    try:
        async with RedisBus.from_url(url, settings=_settings(keys, "manager"), namespace=ns) as bus:
            results = bus.consume("results.noop", group="manager", consumer="stages")
            for i in range(-100, n):  # the first hundred warm up, unmeasured
                if i == 0:
                    mine.send("clear")
                    mine.recv()
                    undo = _instrument(stamps, worker=False)
                start = time.perf_counter_ns()
                await bus.publish("tasks.noop", _assign(i))
                delivery = await anext(results)
                end = time.perf_counter_ns()
                if i >= 0:
                    windows.append((start, end))
                await bus.ack(delivery)  # outside the window, as the race's requesters acknowledge
            mine.send("take")
            worker_stamps: list[tuple[str, int]] = mine.recv()
    finally:
        proc.kill()
        proc.join(10)
        if undo is not None:
            undo()
    return _match(windows, sorted(stamps.items + worker_stamps, key=lambda s: s[1])), \
        [(end - start) / 1e9 for start, end in windows]


def _match(windows: list[tuple[int, int]], stamps: list[tuple[str, int]]) -> list[dict[str, int]]:
    out: list[dict[str, int]] = []
    j = 0
    for start, end in windows:
        while j < len(stamps) and stamps[j][1] < start:
            j += 1
        seen = {"start": start, "end": end}
        k = j
        while k < len(stamps) and stamps[k][1] <= end:
            seen.setdefault(stamps[k][0], stamps[k][1])
            k += 1
        out.append(seen)
    return out


def _stage_medians(trips: list[dict[str, int]]) -> dict[str, float | None]:
    medians: dict[str, float | None] = {}
    for label, a, b in STAGES:
        spans = [(t[b] - t[a]) / 1e3 for t in trips if a in t and b in t and t[b] >= t[a]]
        medians[label] = statistics.median(spans) if len(spans) >= len(trips) // 2 else None
    return medians


def _hot(keys: str | None, n: int = 2000) -> dict[str, float]:
    """The CPU stages' work back to back in this process: microseconds a call."""
    from noop import NoopWorker

    assign_codec = _settings(keys, "manager").codec
    reply_codec = _settings(keys, "worker:noop").codec
    signer = "manager" if keys else None
    frame = assign_codec.encode(_assign(0), signer=signer)
    envelope = assign_codec.decode(frame, stream="tasks.noop")
    reply = envelope.reply(Done(output=INPUT), sender="w")
    reply_frame = reply_codec.encode(reply, signer="worker:noop" if keys else None)
    worker = NoopWorker()

    def handler() -> None:
        task = Task.from_assign(envelope.body, run_id=envelope.run_id, task_id=envelope.task_id,  # type: ignore[arg-type]
                                attempt=envelope.attempt)
        coro = worker.handle(task)
        try:
            coro.send(None)
        except StopIteration as stop:
            envelope.reply(Done(output=stop.value, duration_s=0.0), sender="w")

    work: dict[str, Callable[[], Any]] = {
        "requester: build, encode, sign the assign": lambda: assign_codec.encode(_assign(1), signer=signer),
        "worker: decode + check the assign": lambda: assign_codec.decode(frame, stream="tasks.noop"),
        "worker: handler + reply envelope": handler,
        "worker: encode reply, write commit": lambda: reply_codec.encode(reply, signer="worker:noop" if keys else None),
        "requester: decode + check the reply": lambda: reply_codec.decode(reply_frame, stream="results.noop"),
    }
    out = {}
    for label, fn in work.items():
        runs = []
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(n):
                fn()
            runs.append((time.perf_counter() - start) / n * 1e6)
        out[label] = min(runs)
    return out


def _keyring() -> str:
    from protocol.keyring import Keyring

    path = Path(tempfile.mkdtemp(prefix="stages-keys-"))
    Keyring.init(path).add("worker", "noop")
    return str(path)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an existing Redis (default: start a throwaway redis-server)")
    parser.add_argument("--round-trips", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from protocol.logging import configure_logging

    configure_logging("WARNING")
    from tests._redis import given_or_throwaway

    with given_or_throwaway(args.url) as (url, _):
        print(f"redis at {url}; {args.round_trips} sequential round trips x {args.repeats} repeats")
        rows: dict[str, dict[str, list[float]]] = {}
        p50s: dict[str, list[float]] = {}
        keys = {"signed": _keyring(), "unsigned": None}
        for rep in range(args.repeats):
            for mode, ring in keys.items():
                trips, seconds = await _round_trips(url, args.round_trips, ring)
                p50s.setdefault(mode, []).append(statistics.median(seconds) * 1e6)
                for label, value in _stage_medians(trips).items():
                    if value is not None:
                        rows.setdefault(label, {}).setdefault(mode, []).append(value)
                print(f"  repeat {rep + 1} {mode:8}: round trip p50 {p50s[mode][-1]:6.0f} us")
        hot = {mode: _hot(ring) for mode, ring in keys.items()}
        _print(rows, p50s, hot)


def _print(rows: dict[str, dict[str, list[float]]], p50s: dict[str, list[float]],
           hot: dict[str, dict[str, float]]) -> None:
    def med(values: list[float] | None) -> float | None:
        return statistics.median(values) if values else None

    def cell(value: float | None, width: int = 10, fmt: str = ".0f") -> str:
        return f"{value:{width}{fmt}}" if value is not None else f"{'-':>{width}}"

    width = max(len(label) for label, *_ in STAGES) + 2
    print("\nmedians over repeats, microseconds; 'hot': the same work back to back in one process")
    print(f"{'stage':{width}}{'signed':>10}{'hot':>8}{'x':>6}{'unsigned':>10}{'hot':>8}{'x':>6}")
    total = {"signed": 0.0, "unsigned": 0.0}
    for label, *_ in STAGES:
        line = f"{label:{width}}"
        for mode in ("signed", "unsigned"):
            value, h = med(rows.get(label, {}).get(mode)), hot[mode].get(label)
            total[mode] += value or 0.0
            ratio = value / h if value is not None and h else None
            line += cell(value) + cell(h, 8) + cell(ratio, 6, ".1f")
        print(line)
    print(f"{'sum of the stages':{width}}{total['signed']:10.0f}{'':14}{total['unsigned']:10.0f}")
    print(f"{'round trip p50':{width}}{med(p50s['signed']):10.0f}{'':14}{med(p50s['unsigned']):10.0f}")


if __name__ == "__main__":
    anyio.run(main)
