"""RedisBus beyond the shared contract: fencing across processes, Redis restarts, trimming, errors, keys."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
from pydantic import ValidationError
from redis.asyncio import Redis
from redis.crc import key_slot
from structlog.testing import capture_logs

from protocol.bus import BusSettings, Delivery
from protocol.envelope import Envelope
from protocol.errors import BusUnavailable, LeaseLost
from protocol.messages import Assign, Cancel, Done
from protocol.redis_bus import RedisBus
from protocol.settings import RedisSettings, redact_url
from tests._redis import RedisServer, free_port, redis_server_path
from tests.protocol.test_bus_contract import take

pytestmark = [pytest.mark.redis, pytest.mark.timeout(60)]
# Tests that start, kill and restart their own server need the binary, not just a URL.
own_server = pytest.mark.skipif(redis_server_path() is None, reason="redis-server is not on PATH; install Redis 7")

FAST = BusSettings(lease_s=0.3, max_deliveries=3, block_s=0.05)
ROOT = Path(__file__).resolve().parents[2]


def assign(n: int) -> Envelope:
    return Envelope(run_id="r", task_id=f"t{n}", attempt=1, body=Assign(capability="echo", instruction=f"i{n}"))


def ns() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


def test_key_names_carry_a_capability_hash_tag() -> None:
    bus = RedisBus.from_url("redis://127.0.0.1:1/0", namespace="orch")
    assert bus.key("tasks.echo") == "orch:{cap.echo}:tasks"
    assert bus.key("results.echo") == "orch:{cap.echo}:results"
    assert bus.dead_key("tasks.echo") == "orch:{cap.echo}:tasks:dead"
    slots = {key_slot(k.encode()) for k in (bus.key("tasks.echo"), bus.key("results.echo"),
                                            bus.dead_key("tasks.echo"), bus.dead_key("results.echo"))}
    assert len(slots) == 1
    assert key_slot(bus.key("tasks.echo").encode()) == key_slot(b"{cap.echo}")
    assert bus.key("audit") == "orch:{s.audit}:stream"


async def test_bus_unavailable_names_the_url_without_the_password() -> None:
    port = free_port()  # nothing listens here
    bus = RedisBus.from_url(f"redis://:s3cret@127.0.0.1:{port}/0", settings=FAST, retry_budget_s=0.3)
    async with bus:
        with anyio.fail_after(5), pytest.raises(BusUnavailable) as info:
            await bus.publish("tasks.echo", assign(0))
        text = str(info.value)
        assert f"127.0.0.1:{port}" in text
        assert "s3cret" not in text
        assert "***" in text
        with anyio.fail_after(5), pytest.raises(BusUnavailable):
            await anext(aiter(bus.consume("tasks.echo", group="g", consumer="c")))


_ZOMBIE = """
import sys, anyio
from protocol.bus import BusSettings
from protocol.errors import LeaseLost
from protocol.messages import Done
from protocol.redis_bus import RedisBus
from protocol.settings import RedisSettings, redact_url

async def main(url, namespace):
    async with RedisBus.from_url(url, settings=BusSettings(lease_s=0.3, block_s=0.05), namespace=namespace) as bus:
        async for d in bus.consume("tasks.echo", group="g", consumer="zombie"):
            break
        print("got", d.entry_id, flush=True)
        sys.stdin.readline()  # paused past the lease until the parent says go
        try:
            await bus.commit(d, "results.echo", d.envelope.reply(Done(output="late"), sender="zombie"))
            print("committed", flush=True)
        except LeaseLost as exc:
            print("refused", exc, flush=True)

anyio.run(main, *sys.argv[1:])
"""


def _spawn_zombie(url: str, namespace: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", _ZOMBIE, url, namespace], cwd=ROOT, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


async def test_commit_from_a_stale_owner_in_another_process_is_refused(redis_url: str) -> None:
    namespace = ns()
    async with RedisBus.from_url(redis_url, settings=FAST, namespace=namespace) as bus:
        await bus.publish("tasks.echo", assign(0))
        with _spawn_zombie(redis_url, namespace) as proc:
            assert proc.stdout is not None
            assert proc.stdin is not None
            line = await anyio.to_thread.run_sync(proc.stdout.readline)
            assert line.startswith("got ")
            [fresh] = await take(bus.consume("tasks.echo", group="g", consumer="c2"), 1)
            assert fresh.deliveries == 2
            proc.stdin.write("go\n")
            proc.stdin.flush()
            verdict = await anyio.to_thread.run_sync(proc.stdout.readline)
            assert verdict.startswith("refused"), verdict
            assert "zombie" in verdict
            assert "c2" in verdict
            await bus.commit(fresh, "results.echo", fresh.envelope.reply(Done(output="ok"), sender="c2"))
        results = bus.consume("results.echo", group="m", consumer="m1")
        [r] = await take(results, 1)
        assert r.envelope.body == Done(output="ok")
        assert await bus.depth("results.echo", "m") == 1  # only the one reply, still unacknowledged


async def consume_through(bus: RedisBus, it: AsyncIterator[Delivery], want: set[str],
                          outage: Callable[[], Awaitable[None]]) -> list[Delivery]:
    """Keep consuming (and acking) from ``it`` while ``outage`` runs, until every id in ``want`` came."""
    got: list[Delivery] = []
    done = anyio.Event()

    async def keep_consuming() -> None:
        async for d in it:
            got.append(d)
            await bus.ack(d)
            if {d.envelope.task_id for d in got} >= want:
                done.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(keep_consuming)
        await anyio.sleep(0.2)  # the consumer is blocked in XREADGROUP
        await outage()
        with anyio.fail_after(10):
            await done.wait()
        tg.cancel_scope.cancel()
    return got


@own_server
async def test_consume_survives_kill_9_and_restart_with_aof(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, appendonly=True).start()
    try:
        async with RedisBus.from_url(server.url, settings=FAST, namespace="aof", retry_budget_s=20) as bus:
            for i in range(5):
                await bus.publish("tasks.echo", assign(i))
            it = bus.consume("tasks.echo", group="g", consumer="c1")
            want = {"t1", "t5"}
            first = await take(it, 5)
            for d in first:
                if d.envelope.task_id != "t1":
                    await bus.ack(d)  # t1 stays pending across the crash
            await anyio.sleep(0.1)

            async def crash_and_restart() -> None:
                await anyio.to_thread.run_sync(server.kill)
                await anyio.sleep(0.5)
                await anyio.to_thread.run_sync(server.start)
                await bus.publish("tasks.echo", assign(5))

            got = await consume_through(bus, it, want, crash_and_restart)
            again = next(d for d in got if d.envelope.task_id == "t1")
            assert again.deliveries == 2  # the pending entry and its counter survived the crash
            assert sorted(d.envelope.task_id for d in got) == ["t1", "t5"]
            assert await bus.depth("tasks.echo", "g") == 0
    finally:
        server.kill()


@own_server
async def test_consume_survives_a_redis_that_restarted_empty(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, appendonly=False).start()
    try:
        async with RedisBus.from_url(server.url, settings=FAST, namespace="empty", retry_budget_s=20) as bus:
            await bus.publish("tasks.echo", assign(0))
            it = bus.consume("tasks.echo", group="g", consumer="c1")
            want = {"t1"}
            [d] = await take(it, 1)
            await bus.ack(d)

            async def restart_empty() -> None:
                await anyio.to_thread.run_sync(server.kill)
                server.wipe()
                await anyio.to_thread.run_sync(server.start)
                await bus.publish("tasks.echo", assign(1))  # the group is gone; consume re-creates it

            got = await consume_through(bus, it, want, restart_empty)
            assert [d.envelope.task_id for d in got] == ["t1"]
    finally:
        server.kill()


@own_server
@pytest.mark.usefixtures("debug_logs")
async def test_writes_wait_out_redis_without_a_budget_and_a_cancelled_sender_leaves_the_others_queued(
        tmp_path: Path) -> None:
    """With ``retry_budget_s=None`` a write waits for Redis however long it takes; the caller that happens to
    send a batch can still be cancelled, and the other items of its batch are then sent by their own callers."""
    server = RedisServer(tmp_path)  # not started yet: Redis is down from the first call
    try:
        async with RedisBus.from_url(server.url, settings=FAST, namespace="down", retry_budget_s=None) as bus:
            scopes = {name: anyio.CancelScope() for name in "ab"}
            ended = {name: anyio.Event() for name in "abc"}
            ids: list[str] = []

            async def publish(name: str, n: int) -> None:
                with scopes.get(name, anyio.CancelScope()):
                    ids.append(await bus.publish("tasks.echo", assign(n)))
                ended[name].set()

            with capture_logs() as logs:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(publish, "a", 1)  # a sends a batch of its own item, and waits between attempts
                    await anyio.sleep(0.3)
                    tg.start_soon(publish, "b", 2)  # b and c queue behind a's batch...
                    tg.start_soon(publish, "c", 3)
                    await anyio.sleep(0.3)
                    scopes["a"].cancel()  # ...and once a gives up, b sends a batch of b's and c's items
                    with anyio.fail_after(3):  # at most one backoff wait (capped at 2 s)
                        await ended["a"].wait()
                    await anyio.sleep(0.3)
                    scopes["b"].cancel()  # b gives up too: c's item goes back to the queue, c sends it
                    with anyio.fail_after(3):
                        await ended["b"].wait()
                    await anyio.sleep(1.0)  # still down: c keeps waiting, no budget runs out
                    assert not ids
                    await anyio.to_thread.run_sync(server.start)
                    with anyio.fail_after(10):
                        await ended["c"].wait()
            assert len(ids) == 1
            entries = await bus._redis.xrange(bus.key("tasks.echo"))
            assert [bus.settings.codec.decode(f[b"f"]).task_id for _, f in entries] == ["t3"]  # a's, b's withdrawn
            events = [e["event"] for e in logs if e["event"].startswith("redis_")]
            assert events == ["redis_unreachable", "redis_reachable_again"], events
    finally:
        server.kill()


async def test_streams_stay_small_after_many_acknowledged_messages(redis_url: str) -> None:
    n = 300
    async with RedisBus.from_url(redis_url, settings=FAST, namespace=ns()) as bus:
        for i in range(n):
            await bus.publish("tasks.echo", assign(i))
        tasks = bus.consume("tasks.echo", group="workers", consumer="w1")
        for d in await take(tasks, n):
            await bus.commit(d, "results.echo", d.envelope.reply(Done(output=d.envelope.task_id), sender="w1"))
        results = bus.consume("results.echo", group="manager", consumer="m1")
        for r in await take(results, n):
            await bus.ack(r)
        client = Redis.from_url(redis_url)
        try:
            assert await client.xlen(bus.key("tasks.echo")) == 0
            assert await client.xlen(bus.key("results.echo")) == 0
        finally:
            await client.aclose()


async def test_an_entry_is_kept_until_every_group_has_acknowledged_it(redis_url: str) -> None:
    async with RedisBus.from_url(redis_url, settings=FAST, namespace=ns()) as bus:
        [a] = [d async for d in _first(bus.consume("results.echo", group="a", consumer="x"))] or [None]
        assert a is None
        await bus.publish("results.echo", assign(0))
        [b] = await take(bus.consume("results.echo", group="b", consumer="y"), 1)
        await bus.ack(b)
        [a2] = await take(bus.consume("results.echo", group="a", consumer="x"), 1)  # not deleted by b's ack
        assert a2.envelope.task_id == "t0"
        await bus.ack(a2)
        client = Redis.from_url(redis_url)
        try:
            assert await client.xlen(bus.key("results.echo")) == 0
        finally:
            await client.aclose()


async def _first(it: AsyncIterator[Delivery]) -> AsyncIterator[Delivery]:
    with anyio.move_on_after(0.1):  # just long enough to create group "a" before anything is published
        async for d in it:
            yield d
            return


async def test_publish_waits_while_the_task_stream_is_full(redis_url: str) -> None:
    async with RedisBus.from_url(redis_url, settings=FAST, namespace=ns(), max_task_stream_len=2) as bus:
        await bus.publish("tasks.echo", assign(0))
        await bus.publish("tasks.echo", assign(1))
        with anyio.move_on_after(0.3) as scope:
            await bus.publish("tasks.echo", assign(2))
        assert scope.cancelled_caught
        [d] = await take(bus.consume("tasks.echo", group="g", consumer="c"), 1)
        await bus.ack(d)
        with anyio.fail_after(2):
            await bus.publish("tasks.echo", assign(2))
        await bus.publish("results.echo", assign(3))  # result streams are never bounded
        await bus.publish("results.echo", assign(4))
        await bus.publish("results.echo", assign(5))


@own_server
async def test_password_in_the_url_is_used(tmp_path: Path) -> None:
    server = RedisServer(tmp_path, password="pw-123").start()
    try:
        async with RedisBus.from_url(server.url, settings=FAST, namespace="auth") as bus:
            await bus.publish("tasks.echo", assign(0))
            [d] = await take(bus.consume("tasks.echo", group="g", consumer="c"), 1)
            with pytest.raises(LeaseLost):
                await bus.renew(Delivery(d.stream, d.group, "someone-else", d.entry_id, d.envelope, 1))
            await bus.renew(d)
    finally:
        server.kill()


@own_server
async def test_subscription_survives_a_redis_restart(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    message = Envelope(run_id="r", task_id="t", body=Cancel(reason="stop"))
    try:
        bus = RedisBus.from_url(server.url, settings=FAST, namespace="ps", retry_budget_s=10)
        async with bus, bus.subscribe("control") as messages:
            await bus.broadcast("control", message)
            with anyio.fail_after(5):
                assert await anext(aiter(messages)) == message
            await anyio.to_thread.run_sync(server.kill)
            await anyio.to_thread.run_sync(server.start)
            got: list[Envelope] = []
            async with anyio.create_task_group() as tg:

                async def read_one() -> None:
                    got.append(await anext(aiter(messages)))
                    tg.cancel_scope.cancel()

                tg.start_soon(read_one)
                with anyio.fail_after(10):
                    while True:  # Pub/Sub is at-most-once: repeat until the re-subscription is in place
                        await bus.broadcast("control", message)
                        await anyio.sleep(0.1)
            assert got == [message]
    finally:
        server.kill()


async def test_a_batch_refuses_only_the_stale_commit(redis_url: str) -> None:
    async with RedisBus.from_url(redis_url, settings=FAST, namespace=ns()) as bus:
        for i in range(3):
            await bus.publish("tasks.echo", assign(i))
        held = await take(bus.consume("tasks.echo", group="g", consumer="w1"), 3)
        stale = held[0]
        await bus.release(stale)
        [taken] = await take(bus.consume("tasks.echo", group="g", consumer="w2"), 1)
        assert taken.entry_id == stale.entry_id
        outcomes: dict[str, str] = {}

        async def commit(d: Delivery) -> None:
            try:
                await bus.commit(d, "results.echo", d.envelope.reply(Done(output=1), sender=d.consumer))
                outcomes[d.envelope.task_id] = "ok"
            except LeaseLost:
                outcomes[d.envelope.task_id] = "refused"

        async with anyio.create_task_group() as tg:  # concurrent: one pipelined batch
            for d in held:
                tg.start_soon(commit, d)
        assert outcomes == {"t0": "refused", "t1": "ok", "t2": "ok"}
        assert await bus.depth("tasks.echo", "g") == 1  # only w2's entry is left


@own_server
async def test_writes_recover_when_redis_forgets_the_scripts(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    try:
        async with RedisBus.from_url(server.url, settings=FAST, namespace="noscript") as bus:
            await bus.publish("tasks.echo", assign(0))
            client = Redis.from_url(server.url)
            try:
                await client.script_flush()  # this test's own server
            finally:
                await client.aclose()
            await bus.publish("tasks.echo", assign(1))
            got = await take(bus.consume("tasks.echo", group="g", consumer="c"), 2)
            for d in got:
                await bus.commit(d, "results.echo", d.envelope.reply(Done(output=0), sender="c"))
            assert await bus.depth("tasks.echo", "g") == 0
    finally:
        server.kill()


def test_settings_redact_passwords_and_refuse_bad_namespaces() -> None:
    assert redact_url("rediss://user:pw@h:6380/1") == "rediss://user:***@h:6380/1"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"
    assert RedisSettings.from_url("redis://:pw@h:1/0").safe_url == "redis://:***@h:1/0"
    with pytest.raises(ValidationError, match="namespace"):
        RedisSettings(namespace="a{b}")
    with pytest.raises(ValidationError, match="must start with") as info:
        RedisSettings(url="http://:pw@h:1/")
    assert "pw" not in str(info.value)


_WORKER = """
import sys, anyio
from protocol.bus import BusSettings
from protocol.errors import LeaseLost
from protocol.messages import Done
from protocol.redis_bus import RedisBus

async def main(url, namespace, name):
    settings = BusSettings(lease_s=0.5, max_deliveries=5, block_s=0.05)
    async with RedisBus.from_url(url, settings=settings, namespace=namespace) as bus:
        async for d in bus.consume("tasks.echo", group="workers", consumer=name):
            await anyio.sleep(0.005)
            try:
                await bus.commit(d, "results.echo", d.envelope.reply(Done(output=name), sender=name))
            except LeaseLost:
                pass

anyio.run(main, *sys.argv[1:])
"""


def _spawn_worker(url: str, namespace: str, name: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", _WORKER, url, namespace, name], cwd=ROOT,
                            stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.slow
async def test_killed_worker_loses_no_task_and_duplicates_no_result(redis_url: str) -> None:
    n, namespace = 200, ns()
    settings = BusSettings(lease_s=0.5, max_deliveries=5, block_s=0.05)
    async with RedisBus.from_url(redis_url, settings=settings, namespace=namespace) as bus:
        for i in range(n):
            await bus.publish("tasks.echo", assign(i))
        workers = [_spawn_worker(redis_url, namespace, "a"), _spawn_worker(redis_url, namespace, "b")]
        seen: dict[str, int] = {}
        try:
            with anyio.fail_after(30):
                async for r in bus.consume("results.echo", group="manager", consumer="m"):
                    seen[r.envelope.task_id] = seen.get(r.envelope.task_id, 0) + 1
                    await bus.ack(r)
                    if len(seen) == 40 and workers[0].poll() is None:
                        workers[0].kill()  # kill -9 worker "a" with entries in flight
                        workers.append(_spawn_worker(redis_url, namespace, "c"))
                    if len(seen) == n:
                        break
        finally:
            for proc in workers:
                proc.kill()
                proc.wait(timeout=10)
        assert sorted(seen) == sorted(f"t{i}" for i in range(n))
        assert max(seen.values()) == 1  # fencing: one committed result per task
        assert await bus.depth("tasks.echo", "workers") == 0
        assert await bus.dead_letters("tasks.echo") == []


@own_server
async def test_writes_wait_out_a_readonly_server(tmp_path: Path) -> None:
    server = RedisServer(tmp_path).start()
    try:
        admin = Redis.from_url(server.url)
        async with RedisBus.from_url(server.url, settings=FAST, namespace="ro", retry_budget_s=10) as bus:
            await bus.publish("tasks.echo", assign(0))
            await admin.replicaof("127.0.0.1", str(free_port()))  # now a replica of nobody: writes get READONLY
            async with anyio.create_task_group() as tg:

                async def promote_later() -> None:
                    await anyio.sleep(0.3)
                    await admin.replicaof("NO", "ONE")

                tg.start_soon(promote_later)
                with anyio.fail_after(5):
                    await bus.publish("tasks.echo", assign(1))  # retried until the server accepts writes
            assert await bus.depth("tasks.echo", "g") == 2
        await admin.aclose()
    finally:
        server.kill()


async def test_a_slow_consumer_does_not_hoard_entries(redis_url: str) -> None:
    settings = BusSettings(lease_s=3.0, max_deliveries=3, block_s=0.05)
    async with RedisBus.from_url(redis_url, settings=settings, namespace=ns()) as bus:
        for i in range(10):
            await bus.publish("tasks.echo", assign(i))
        slow = bus.consume("tasks.echo", group="g", consumer="slow")
        [first] = await take(slow, 1)  # ... and then works on it for a long time
        rest = await take(bus.consume("tasks.echo", group="g", consumer="fast"), 9, within=1.0)
        assert {d.envelope.task_id for d in rest} == {f"t{i}" for i in range(10)} - {first.envelope.task_id}
        assert all(d.deliveries == 1 for d in rest)


async def test_prefetched_entries_are_handed_back_when_the_caller_stalls(redis_url: str) -> None:
    settings = BusSettings(lease_s=1.0, max_deliveries=3, block_s=0.05)
    async with RedisBus.from_url(redis_url, settings=settings, namespace=ns()) as bus:
        for i in range(15):
            await bus.publish("tasks.echo", assign(i))
        a = bus.consume("tasks.echo", group="g", consumer="a")
        quick = await take(a, 8)  # reads of 1, 2, 4, then 8: seven entries wait in a's buffer
        assert all(d.deliveries == 1 for d in quick)
        await anyio.sleep(0.6)  # past half a lease
        [again] = await take(a, 1)  # a hands its buffer back, then reclaims one of it
        assert again.deliveries == 2
        # The other six are claimable right away, long before their lease would have run out.
        others = await take(bus.consume("tasks.echo", group="g", consumer="b"), 6, within=0.4)
        assert all(d.deliveries == 2 for d in others)
        assert len({d.entry_id for d in [*quick, again, *others]}) == 15


async def test_closing_a_consumer_hands_back_its_prefetched_entries(redis_url: str) -> None:
    # A worker stopping (SIGTERM) closes its consume iterator: entries read ahead must not wait for the lease.
    settings = BusSettings(lease_s=30.0, max_deliveries=3, block_s=0.05)
    async with RedisBus.from_url(redis_url, settings=settings, namespace=ns()) as bus:
        for i in range(15):
            await bus.publish("tasks.echo", assign(i))
        a = bus.consume("tasks.echo", group="g", consumer="a")
        quick = await take(a, 8)  # reads of 1, 2, 4, then 8: seven entries wait in a's buffer
        await a.aclose()  # type: ignore[attr-defined]
        others = await take(bus.consume("tasks.echo", group="g", consumer="b"), 7, within=1.0)
        assert len({d.entry_id for d in [*quick, *others]}) == 15


# -- reads wait for the bus's own writes in flight ---------------------------------------------------


def _hold_writes(bus: RedisBus) -> anyio.Event:
    """Hold ``bus``'s write batches on their way to Redis until the returned event is set.

    Stands in for a slow answer from Redis to one process's writes alone (anything that slows Redis itself
    slows the read under test too)."""
    release = anyio.Event()
    send = bus._writes._send

    async def held(calls: Any) -> Any:
        await release.wait()
        return await send(calls)

    bus._writes._send = held  # type: ignore[method-assign]
    return release


async def _pending(redis_url: str, key: str) -> int:
    async with Redis.from_url(redis_url) as raw:
        [group] = await raw.xinfo_groups(key)
        return int(group["pending"])


@pytest.mark.parametrize(("stream", "wait_s", "read_while_held"), [
    ("results.echo", 0.0, True), ("results.echo", 0.3, True), ("results.echo", 30.0, False),
    ("tasks.echo", 30.0, True)])
async def test_a_reader_of_replies_reads_again_once_its_writes_in_flight_are_answered(
        redis_url: str, stream: str, wait_s: float, read_while_held: bool) -> None:
    # A manager's next read of replies waits while its writes are in flight (assigns, acks), so the replies
    # that arrive meanwhile come in one read (one wake-up) instead of one read each; bounded by
    # results_read_after_writes_s, 0 reads at once, and a worker's reads of tasks never wait.
    settings = BusSettings(lease_s=30.0, block_s=5.0)
    namespace = ns()
    async with RedisBus.from_url(redis_url, settings=settings, namespace=namespace,
                                 results_read_after_writes_s=wait_s) as bus, \
            RedisBus.from_url(redis_url, settings=settings, namespace=namespace) as producer:
        await producer.publish(stream, assign(0))
        deliveries = bus.consume(stream, group="g", consumer="c")
        [first] = await take(deliveries, 1)
        release = _hold_writes(bus)
        got: list[Delivery] = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(bus.ack, first)  # in flight until released
            await anyio.sleep(0.05)

            async def read_two() -> None:
                got.extend(await take(deliveries, 2))

            tg.start_soon(read_two)
            try:
                await anyio.sleep(0.1)
                for i in (1, 2):
                    await producer.publish(stream, assign(i))
                await anyio.sleep(0.6)
                # Pending: the first (its ack held), and the other two once read.
                read_before_release = await _pending(redis_url, bus.key(stream)) == 3
            finally:
                release.set()
        assert read_before_release is read_while_held
        assert [d.envelope.task_id for d in got] == ["t1", "t2"]


async def test_a_reader_of_replies_with_a_backlog_reads_without_waiting_for_its_writes(redis_url: str) -> None:
    settings = BusSettings(lease_s=30.0, block_s=5.0)
    async with RedisBus.from_url(redis_url, settings=settings, namespace=ns(),
                                 results_read_after_writes_s=30.0) as bus:
        for i in range(4):
            await bus.publish("results.echo", assign(i))
        deliveries = bus.consume("results.echo", group="g", consumer="c")
        [first] = await take(deliveries, 1)  # a read of one, full: more may be waiting
        release = _hold_writes(bus)
        async with anyio.create_task_group() as tg:
            tg.start_soon(bus.ack, first)
            await anyio.sleep(0.05)
            try:
                more = await take(deliveries, 3, within=2.0)  # read while the ack is still held
            finally:
                release.set()
        assert [d.envelope.task_id for d in more] == ["t1", "t2", "t3"]


# -- held connections: the batcher's and each open consume's -------------------------------------


def _in_use(bus: RedisBus) -> int:
    return len(bus._redis.connection_pool._in_use_connections)


async def test_a_closed_consume_gives_its_connection_back_to_the_pool(redis_server: RedisServer) -> None:
    async with RedisBus.from_url(redis_server.url, settings=FAST, namespace=ns()) as bus:
        await bus.publish("tasks.echo", assign(0))
        assert _in_use(bus) == 1  # the batcher's
        deliveries = bus.consume("tasks.echo", group="g", consumer="c")
        with anyio.fail_after(5):
            delivery = await anext(aiter(deliveries))
        assert _in_use(bus) == 2  # and the consume's
        await bus.ack(delivery)
        await deliveries.aclose()  # an async generator
        assert _in_use(bus) == 1

        # Cancelled in the middle of a blocking read: the connection goes back too, and comes out clean.
        async def drain() -> None:
            async for _ in bus.consume("tasks.echo", group="g", consumer="c"):
                pass

        async with anyio.create_task_group() as tg:
            tg.start_soon(drain)
            await anyio.sleep(0.2)  # several empty polls of block_s
            assert _in_use(bus) == 2
            tg.cancel_scope.cancel()
        assert _in_use(bus) == 1
        await bus.publish("tasks.echo", assign(1))
        async with contextlib.aclosing(bus.consume("tasks.echo", group="g", consumer="c")) as again:
            with anyio.fail_after(5):
                delivery = await anext(again)
        assert delivery.envelope.task_id == "t1"
        assert _in_use(bus) == 1


async def test_held_connections_recover_when_the_server_kills_them(redis_server: RedisServer) -> None:
    async with RedisBus.from_url(redis_server.url, settings=FAST, namespace=ns()) as bus:
        await bus.publish("tasks.echo", assign(0))
        async with contextlib.aclosing(bus.consume("tasks.echo", group="g", consumer="c")) as deliveries:
            with anyio.fail_after(5):
                first = await anext(deliveries)
            await bus.ack(first)
            raw = Redis.from_url(redis_server.url)
            try:
                killed = await raw.client_kill_filter(_type="normal", skipme=True)
            finally:
                await raw.aclose()
            assert int(killed) >= 2  # the batcher's connection and the consume's
            with anyio.fail_after(5):
                await bus.publish("tasks.echo", assign(1))  # the batcher reconnects
                second = await anext(deliveries)  # and so does the consume
            assert second.envelope.task_id == "t1"
            await bus.commit(second, "results.echo", second.envelope.reply(Done(output=1), sender="w"))
        assert [e.body.type for _, e in await bus.read("results.echo")] == ["done"]


async def test_consume_reads_resp3_replies(redis_server: RedisServer) -> None:
    async with RedisBus.from_url(redis_server.url + "?protocol=3", settings=FAST, namespace=ns()) as bus:
        await bus.publish_many("tasks.echo", [assign(0), assign(1)])
        async with contextlib.aclosing(bus.consume("tasks.echo", group="g", consumer="c")) as deliveries:
            with anyio.fail_after(5):
                got = [await anext(deliveries), await anext(deliveries)]
            assert [d.envelope.task_id for d in got] == ["t0", "t1"]
            for d in got:
                await bus.commit(d, "results.echo", d.envelope.reply(Done(output=1), sender="w"))
        assert await bus.depth("tasks.echo", "g") == 0


async def test_held_connections_run_the_health_check_a_url_asks_for(redis_server: RedisServer) -> None:
    raw = Redis.from_url(redis_server.url)

    async def pings() -> int:
        return int((await raw.info("commandstats")).get("cmdstat_ping", {}).get("calls", 0))

    try:
        async with RedisBus.from_url(redis_server.url + "?health_check_interval=1", settings=FAST,
                                     namespace=ns()) as bus:
            await bus.publish("tasks.echo", assign(0))
            await anyio.sleep(1.2)  # idle past the interval: the next command checks the connection first
            before = await pings()
            await bus.publish("tasks.echo", assign(1))
            assert await pings() > before
    finally:
        await raw.aclose()


def test_the_bus_packs_commands_byte_for_byte_as_redis_py() -> None:
    from redis.asyncio.connection import Connection

    from protocol.redis_bus import _pack

    big = os.urandom(20_000)
    commands = [("EVALSHA", "ab" * 20, 2, "k1", "k2", 0, -7, 10**15, "héllo", b"", b"\x00\r\n", big),
                ("XREADGROUP", "GROUP", "g", "c", "COUNT", 32, "BLOCK", 50, "STREAMS", "key", ">"),
                ("EVALSHA", "x" * 6000, b"y" * 6000, b"z" * 6001)]
    packed = _pack(commands)
    assert packed is not None
    assert b"".join(packed) == b"".join(Connection().pack_commands(commands))
    assert any(part is big for part in packed)  # large values go out uncopied
    for odd in (1.5, True, memoryview(b"m"), bytearray(b"b")):  # left to redis-py (which refuses bools)
        assert _pack([("SET", "k", odd)]) is None


async def test_a_big_value_is_written_in_pieces_and_read_whole(redis_url: str) -> None:
    namespace = ns()
    parts = [f"part {i};".encode() * (i % 7 + 1) for i in range(400)] + [b"x" * 5000, b"end"]
    async with RedisBus.from_url(redis_url, namespace=namespace, value_piece_bytes=1024) as bus:
        await bus.put_values_in_parts({"run/big": parts}, ttl_s=60)
        assert await bus.get_value("run/big") == b"".join(parts)
        await bus.put_values_in_parts({"run/big": [b"small"]}, ttl_s=60)  # small after big: one write, as before
        assert await bus.get_value("run/big") == b"small"
    async with Redis.from_url(redis_url) as raw:
        assert 0 < await raw.pttl(f"{namespace}:value:run/big") <= 60_000
        assert [k async for k in raw.scan_iter(f"{namespace}:staging:*")] == []  # nothing left behind


async def test_a_run_summary_with_compressed_blocks_is_written_whole(redis_url: str) -> None:
    # The manager's summary of a big run keeps its ended tasks' blocks compressed, inflated as the bus reads them.
    from orchestrator.job import parse_job
    from orchestrator.records import RunRecord
    from orchestrator.snapshots import BLOCK, Snapshots
    from protocol.states import TaskState

    run = RunRecord.new(parse_job({"goal": "g", "tasks": [{"id": f"t{i}", "capability": "x"}
                                                          for i in range(3 * BLOCK)]}))
    snapshots = Snapshots()
    for task in list(run.tasks.values())[:2 * BLOCK]:
        task.state, task.output = TaskState.ACCEPTED, {"n": task.id}
        snapshots.changed(run.run_id, task.id)
    summary = snapshots.render(run, now=0.0)
    async with RedisBus.from_url(redis_url, namespace=ns(), value_piece_bytes=1024) as bus:
        await bus.put_values_in_parts({"run/big": summary}, ttl_s=60)
        assert json.loads(await bus.get_value("run/big") or b"") == run.summary()


async def test_writes_of_one_value_land_in_the_order_they_were_made(redis_url: str) -> None:
    big = [b"a" * 1000] * 50
    async with RedisBus.from_url(redis_url, namespace=ns(), value_piece_bytes=1024) as bus:
        async with anyio.create_task_group() as tg:
            tg.start_soon(bus.put_values_in_parts, {"k": big})
            await anyio.lowlevel.checkpoint()  # the big write has begun, a piece at a time
            tg.start_soon(bus.put_values_in_parts, {"k": [b"later"]})
        assert await bus.get_value("k") == b"later"


async def test_a_staged_piece_is_applied_once_and_never_onto_a_lost_staging_key(redis_url: str) -> None:
    from redis.exceptions import ResponseError

    from protocol import _redis_lua as lua

    async with RedisBus.from_url(redis_url, namespace=ns()) as bus:
        key = f"{bus.redis_settings.namespace}:staging:{{test}}:1"
        for _ in range(2):  # the second is a retried call: already applied, not appended again
            assert await bus._eval(lua.STAGE_PIECE, [key], [60_000, 0, b"abc"]) == 1
        assert await bus._eval(lua.STAGE_PIECE, [key], [60_000, 3, b"def"]) == 1
        with pytest.raises(ResponseError, match=r"^STAGING value lost: 6 bytes staged, 9 expected"):
            await bus._eval(lua.STAGE_PIECE, [key], [60_000, 9, b"ghi"])  # a piece went missing
        assert await bus._redis.get(key) == b"abcdef"
        assert await bus._eval(lua.PUT_STAGED, [key, "elsewhere-" + key], [0]) == 1
        assert await bus._eval(lua.PUT_STAGED, [key, "elsewhere-" + key], [0]) == 0  # retried: nothing to move


async def test_publish_each_with_a_ttl_keeps_each_stream_that_long_after_the_write(redis_url: str) -> None:
    async with RedisBus.from_url(redis_url, settings=FAST, namespace=ns()) as bus:
        kept = [f"events.r{i}" for i in range(3)]
        await bus.publish_each([(s, assign(i)) for i, s in enumerate(kept)] + [(kept[0], assign(3))], ttl_s=60)
        await bus.publish_each([("events.plain", assign(4))])
        raw = Redis.from_url(redis_url)
        try:
            ttls = [await raw.ttl(bus.key(s)) for s in kept]
            plain = await raw.ttl(bus.key("events.plain"))
        finally:
            await raw.aclose()
        assert all(55 <= ttl <= 60 for ttl in ttls), ttls
        assert plain == -1  # kept for ever unless asked
        assert [env.task_id for _, env in await bus.read(kept[0])] == ["t0", "t3"]


async def test_expire_each_sets_every_stream_to_expire_in_one_call(redis_url: str) -> None:
    async with RedisBus.from_url(redis_url, settings=FAST, namespace=ns()) as bus:
        streams = [f"events.r{i}" for i in range(3)]
        await bus.publish_each([(s, assign(i)) for i, s in enumerate(streams)])
        await bus.expire_each(streams, 60)
        await bus.expire_each([], 60)  # nothing to expire is not an error
        raw = Redis.from_url(redis_url)
        try:
            ttls = [await raw.ttl(bus.key(s)) for s in streams]
        finally:
            await raw.aclose()
        assert all(55 <= ttl <= 60 for ttl in ttls), ttls


@own_server
async def test_a_redis_that_stops_answering_is_given_up_on_after_the_socket_timeout(tmp_path: Path) -> None:
    # The bus times replies itself (one timer per connection, not one per reply): a server that takes a
    # command and never answers must still end the wait, and the bus must reconnect once it answers again.
    import signal
    import time

    server = RedisServer(tmp_path).start()
    assert server.proc is not None
    try:
        async with RedisBus.from_url(server.url, settings=FAST, namespace=ns(), socket_timeout_s=0.5,
                                     retry_budget_s=1.0) as bus:
            await bus.publish("tasks.echo", assign(0))  # the write connection is held from here on
            os.kill(server.proc.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(BusUnavailable):
                    await bus.publish("tasks.echo", assign(1))
                assert time.monotonic() - started < 5  # without a read deadline it would wait for ever
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
            with anyio.fail_after(10):
                await bus.publish("tasks.echo", assign(2))
                got = await take(bus.consume("tasks.echo", group="g", consumer="c"), 2)
            assert got[0].envelope.task_id == "t0"
            assert "t2" in [d.envelope.task_id for d in got] + [
                d.envelope.task_id for d in await take(bus.consume("tasks.echo", group="g", consumer="c"), 1)]
    finally:
        server.kill()


def _signing(**settings: Any) -> BusSettings:
    import tempfile

    from protocol.codec import Codec
    from protocol.keyring import Keyring

    ring = Keyring.init(Path(tempfile.mkdtemp(prefix="bus-keys-")), operator="o")
    return BusSettings(lease_s=0.3, max_deliveries=3, block_s=0.05,
                       codec=Codec(keyring=ring, signers=("manager",), **settings))


async def _proofs(redis_url: str, bus: RedisBus, stream: str) -> list[dict[str, object]]:
    import msgpack

    raw = Redis.from_url(redis_url)
    try:
        entries = await raw.xrange(bus.key(stream))
    finally:
        await raw.aclose()
    return [{k: v for k, v in msgpack.unpackb(fields[b"f"]).items() if k in ("sig", "bsig")} for _, fields in entries]


async def test_envelopes_published_at_once_share_a_signature_and_each_checks_alone(redis_url: str) -> None:
    async with RedisBus.from_url(redis_url, settings=_signing(), namespace=ns()) as bus:
        await bus.publish("tasks.echo", assign(-1))  # alone: a signature of its own
        async with anyio.create_task_group() as tg:  # the first goes out alone; the rest wait for it, then go together
            for n in range(40):
                tg.start_soon(bus.publish, "tasks.echo", assign(n))
        proofs = await _proofs(redis_url, bus, "tasks.echo")
        assert "sig" in proofs[0]
        batched = [p["bsig"][0] for p in proofs if "bsig" in p]  # type: ignore[index]
        assert len(batched) >= 30, proofs  # one signature for most of them
        assert len(set(batched)) <= 3
        got = await take(bus.consume("tasks.echo", group="g", consumer="c"), 41)
        assert sorted(d.envelope.task_id for d in got) == sorted(f"t{n}" for n in range(-1, 40))
        assert all(d.envelope.signer == "manager" for d in got)


async def test_a_publish_that_cannot_be_encoded_fails_alone(redis_url: str) -> None:
    from protocol.errors import BadSignature, FrameTooLarge

    async with RedisBus.from_url(redis_url, settings=_signing(max_frame_bytes=2000), namespace=ns()) as bus:
        too_big = Envelope(run_id="r", task_id="big", attempt=1, body=Assign(capability="echo", instruction="x" * 3000))
        errors: list[BaseException] = []

        async def publish(stream: str, envelope: Envelope) -> None:
            try:
                await bus.publish(stream, envelope)
            except (FrameTooLarge, BadSignature) as exc:
                errors.append(exc)

        async with anyio.create_task_group() as tg:
            for n in range(10):
                tg.start_soon(publish, "tasks.echo", assign(n))
            tg.start_soon(publish, "tasks.echo", too_big)
            tg.start_soon(publish, "results.echo", assign(99))  # only a worker of echo may sign there
            for n in range(10, 20):
                tg.start_soon(publish, "tasks.echo", assign(n))
        assert sorted(type(e).__name__ for e in errors) == ["BadSignature", "FrameTooLarge"], errors
        got = await take(bus.consume("tasks.echo", group="g", consumer="c"), 20)
        assert sorted(d.envelope.task_id for d in got) == sorted(f"t{n}" for n in range(20))


@pytest.mark.parametrize("signed", [False, True])
async def test_a_refused_publish_leaves_no_reference_cycle_behind(redis_url: str, signed: bool) -> None:
    # The refusal's traceback held frames whose locals led back to it (the write, its envelope): a cycle only a
    # full collection frees, which kept a big run's refused history mirror alive for the rest of the run.
    import gc

    from protocol.codec import Codec
    from protocol.errors import FrameTooLarge

    settings = _signing(max_frame_bytes=2000) if signed else BusSettings(codec=Codec(max_frame_bytes=2000))
    async with RedisBus.from_url(redis_url, settings=settings, namespace=ns()) as bus:
        too_big = Envelope(run_id="r", task_id="big", attempt=1, body=Assign(capability="echo", instruction="x" * 3000))
        await bus.publish("tasks.echo", assign(0))  # connections and scripts ready: nothing left to set up
        gc.collect()
        gc.disable()
        try:
            for publish in (lambda: bus.publish("tasks.echo", too_big),
                            lambda: bus.publish_many("tasks.echo", [assign(1), too_big]),
                            lambda: bus.publish_each([("tasks.echo", assign(2)), ("events.r", too_big)])):
                try:
                    await publish()
                except FrameTooLarge:
                    pass
                else:
                    pytest.fail("a message over the frame limit was published")
            assert gc.collect() == 0
        finally:
            gc.enable()


async def test_an_envelope_the_codec_chokes_on_fails_its_publish_and_the_batch_goes_on(redis_url: str) -> None:
    from dataclasses import dataclass

    from protocol.codec import Codec

    @dataclass(frozen=True, slots=True)
    class Choking(Codec):
        """A codec with a bug that one envelope trips (not a ProtocolError): the batcher must not lose the rest."""

        def encode(self, envelope: Envelope, *, signer: str | None = None) -> bytes:
            if envelope.task_id == "tbad":
                raise RuntimeError("codec bug")
            return super(Choking, self).encode(envelope, signer=signer)

        def encode_each(self, items: Any) -> Any:
            if any(envelope.task_id == "tbad" for envelope, _ in items):
                raise RuntimeError("codec bug")
            return super(Choking, self).encode_each(items)

    settings = BusSettings(lease_s=0.3, max_deliveries=3, block_s=0.05, codec=Choking())
    async with RedisBus.from_url(redis_url, settings=settings, namespace=ns()) as bus:
        errors: list[BaseException] = []

        async def publish(n: int | str) -> None:
            try:
                await bus.publish("tasks.echo", Envelope(run_id="r", task_id=f"t{n}", attempt=1,
                                                         body=Assign(capability="echo", instruction="i")))
            except RuntimeError as exc:
                errors.append(exc)

        with anyio.fail_after(10):
            async with anyio.create_task_group() as tg:
                for n in [*range(10), "bad", *range(10, 20)]:
                    tg.start_soon(publish, n)
            await publish(20)  # the bus still works
        assert [str(e) for e in errors] == ["codec bug"]
        got = await take(bus.consume("tasks.echo", group="g", consumer="c"), 21)
        assert sorted(d.envelope.task_id for d in got) == sorted(f"t{n}" for n in range(21))
