"""The bus contract: every implementation must pass every test here (see ``bus`` in conftest)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import anyio
import pytest

from protocol.bus import Bus, Delivery
from protocol.envelope import Envelope
from protocol.errors import FrameTooLarge, LeaseLost, ValueTooLarge
from protocol.messages import Assign, Cancel, Done

pytestmark = pytest.mark.timeout(30)


def assign(n: int = 0) -> Envelope:
    return Envelope(run_id="r", task_id=f"t{n}", attempt=1, body=Assign(capability="echo", instruction=f"i{n}"))


@pytest.fixture
def stream() -> str:
    return f"tasks.test-{uuid.uuid4().hex[:8]}"


async def take(it: AsyncIterator[Delivery], n: int, within: float = 10.0) -> list[Delivery]:
    out: list[Delivery] = []
    with anyio.fail_after(within):
        async for d in it:
            out.append(d)
            if len(out) == n:
                break
    return out


async def nothing_within(it: AsyncIterator[Delivery], seconds: float) -> bool:
    with anyio.move_on_after(seconds):
        async for _ in it:
            return False
    return True


async def test_publish_then_consume_round_trips_the_envelope(bus: Bus, stream: str) -> None:
    sent = assign()
    await bus.publish(stream, sent)
    [d] = await take(bus.consume(stream, group="g", consumer="c1"), 1)
    assert d.envelope == sent
    assert d.deliveries == 1


async def test_group_created_late_still_sees_earlier_entries(bus: Bus, stream: str) -> None:
    for i in range(3):
        await bus.publish(stream, assign(i))
    got = await take(bus.consume(stream, group="late", consumer="c1"), 3)
    assert [d.envelope.task_id for d in got] == ["t0", "t1", "t2"]


async def test_each_entry_goes_to_one_consumer_of_a_group(bus: Bus, stream: str) -> None:
    n = 20
    for i in range(n):
        await bus.publish(stream, assign(i))
    seen: dict[str, list[str]] = {"a": [], "b": []}

    async def drain(name: str) -> None:
        async for d in bus.consume(stream, group="g", consumer=name):
            seen[name].append(d.envelope.task_id)
            await bus.ack(d)
            await anyio.lowlevel.checkpoint()

    with anyio.move_on_after(1.0):
        async with anyio.create_task_group() as tg:
            tg.start_soon(drain, "a")
            tg.start_soon(drain, "b")
    everything = seen["a"] + seen["b"]
    assert sorted(everything) == sorted(f"t{i}" for i in range(n))
    assert len(everything) == len(set(everything))


async def test_acknowledged_entries_are_not_delivered_again(bus: Bus, stream: str) -> None:
    await bus.publish(stream, assign())
    it = bus.consume(stream, group="g", consumer="c1")
    [d] = await take(it, 1)
    await bus.ack(d)
    assert await nothing_within(bus.consume(stream, group="g", consumer="c2"), bus.settings.lease_s * 2)
    assert await bus.depth(stream, "g") == 0


async def test_unacknowledged_entry_is_reclaimed_after_its_lease(bus: Bus, stream: str) -> None:
    await bus.publish(stream, assign())
    [first] = await take(bus.consume(stream, group="g", consumer="dead-worker"), 1)
    [again] = await take(bus.consume(stream, group="g", consumer="c2"), 1)
    assert again.entry_id == first.entry_id
    assert again.consumer == "c2"
    assert again.deliveries == 2


async def test_renewed_lease_is_not_reclaimed(bus: Bus, stream: str) -> None:
    await bus.publish(stream, assign())
    [d] = await take(bus.consume(stream, group="g", consumer="slow"), 1)
    other = bus.consume(stream, group="g", consumer="thief")
    for _ in range(4):  # well past one lease in total
        await anyio.sleep(bus.settings.lease_s / 2)
        await bus.renew(d)
    assert await nothing_within(other, bus.settings.lease_s / 2)


async def test_only_the_entries_whose_lease_ran_out_are_reclaimed(bus: Bus, stream: str) -> None:
    for i in range(6):
        await bus.publish(stream, assign(i))
    held = await take(bus.consume(stream, group="g", consumer="crashed"), 6)
    await bus.ack(held[2])
    kept = [held[1], held[4]]  # a live worker renews these
    thief = bus.consume(stream, group="g", consumer="c2")

    async def renew() -> None:
        while True:
            for d in kept:
                await bus.renew(d)
            await anyio.sleep(bus.settings.lease_s / 4)

    async with anyio.create_task_group() as tg:
        tg.start_soon(renew)
        reclaimed = await take(thief, 3)
        for d in reclaimed:
            await bus.ack(d)
        assert await nothing_within(thief, bus.settings.lease_s)  # the renewed ones stay with their worker
        tg.cancel_scope.cancel()
    assert [d.envelope.task_id for d in reclaimed] == ["t0", "t3", "t5"]
    assert all(d.deliveries == 2 for d in reclaimed)


async def test_commit_publishes_reply_and_acknowledges(bus: Bus, stream: str) -> None:
    await bus.publish(stream, assign())
    [d] = await take(bus.consume(stream, group="g", consumer="c1"), 1)
    await bus.commit(d, stream + ".results", d.envelope.reply(Done(output=42), sender="c1"))
    [r] = await take(bus.consume(stream + ".results", group="m", consumer="m1"), 1)
    assert r.envelope.body == Done(output=42)
    assert await bus.depth(stream, "g") == 0


async def test_late_commit_from_a_reclaimed_consumer_is_refused(bus: Bus, stream: str) -> None:
    await bus.publish(stream, assign())
    [stale] = await take(bus.consume(stream, group="g", consumer="paused"), 1)
    [fresh] = await take(bus.consume(stream, group="g", consumer="c2"), 1)
    with pytest.raises(LeaseLost, match="paused"):
        await bus.commit(stale, stream + ".results", stale.envelope.reply(Done(output="late"), sender="paused"))
    with pytest.raises(LeaseLost):
        await bus.renew(stale)
    await bus.commit(fresh, stream + ".results", fresh.envelope.reply(Done(output="ok"), sender="c2"))
    [r] = await take(bus.consume(stream + ".results", group="m", consumer="m1"), 1)
    assert r.envelope.body == Done(output="ok")
    assert await nothing_within(bus.consume(stream + ".results", group="m", consumer="m1"), 0.2)


async def test_entry_delivered_too_often_goes_to_dead_letters(bus: Bus, stream: str) -> None:
    await bus.publish(stream, assign())
    for k in range(bus.settings.max_deliveries):
        [d] = await take(bus.consume(stream, group="g", consumer=f"crasher{k}"), 1)
        assert d.deliveries == k + 1
    assert await nothing_within(bus.consume(stream, group="g", consumer="next"), bus.settings.lease_s * 2)
    [dead] = await bus.dead_letters(stream)
    assert "delivered 3 times" in dead.reason
    assert await bus.dead_letter_count(stream) == 1
    assert await bus.dead_letters(stream, last=1) == [dead]
    assert await bus.dead_letters(stream, last=0) == []
    assert bus.settings.codec.decode(dead.frame).task_id == "t0"


async def test_garbage_frame_goes_to_dead_letters_and_the_rest_flows(bus: Bus, stream: str) -> None:
    await bus.publish_frame(stream, b"\xc1 not msgpack")
    await bus.publish(stream, assign(1))
    [d] = await take(bus.consume(stream, group="g", consumer="c1"), 1)
    assert d.envelope.task_id == "t1"
    [dead] = await bus.dead_letters(stream)
    assert "undecodable" in dead.reason
    assert dead.frame == b"\xc1 not msgpack"


async def test_a_buried_entry_goes_to_dead_letters_at_once_with_its_frame_and_reason(bus: Bus, stream: str) -> None:
    frame = bus.settings.codec.encode(assign(0))
    await bus.publish_frame(stream, frame)
    await bus.publish(stream, assign(1))
    [d] = await take(bus.consume(stream, group="g", consumer="c1"), 1)
    await bus.bury(d, "the consumer cannot handle it")
    [dead] = await bus.dead_letters(stream)
    assert (dead.reason, dead.frame, dead.deliveries) == ("the consumer cannot handle it", frame, 1)
    [nxt] = await take(bus.consume(stream, group="g", consumer="c2"), 1)  # the buried one is not redelivered
    assert nxt.envelope.task_id == "t1"
    assert await bus.depth(stream, "g") == 1


async def test_released_entry_is_redelivered_promptly(bus: Bus, stream: str) -> None:
    await bus.publish(stream, assign())
    bus_lease = bus.settings.lease_s
    [d] = await take(bus.consume(stream, group="g", consumer="draining"), 1)
    await bus.release(d)
    with anyio.fail_after(bus_lease * 0.9):
        [again] = await take(bus.consume(stream, group="g", consumer="c2"), 1)
    assert again.envelope == d.envelope


async def test_depth_counts_waiting_and_pending(bus: Bus, stream: str) -> None:
    for i in range(3):
        await bus.publish(stream, assign(i))
    [d] = await take(bus.consume(stream, group="g", consumer="c1"), 1)
    assert await bus.depth(stream, "g") == 3
    await bus.ack(d)
    assert await bus.depth(stream, "g") == 2


async def test_broadcast_reaches_every_subscriber(bus: Bus) -> None:
    topic = f"control-{uuid.uuid4().hex[:6]}"
    message = Envelope(run_id="r", task_id="t", body=Cancel(reason="stop"))
    async with bus.subscribe(topic) as a, bus.subscribe(topic) as b:
        await bus.broadcast(topic, message)
        with anyio.fail_after(5):
            assert await anext(aiter(a)) == message
            assert await anext(aiter(b)) == message


async def test_values_are_stored_read_and_expire(bus: Bus) -> None:
    key = f"value-{uuid.uuid4().hex[:6]}"
    assert await bus.get_value(key) is None
    await bus.put_value(key, b"one")
    await bus.put_value(key, b"two")
    assert await bus.get_value(key) == b"two"
    await bus.put_value(key + "-short", b"x", ttl_s=0.1)
    await anyio.sleep(0.3)
    assert await bus.get_value(key + "-short") is None


async def test_several_values_are_stored_at_once_and_expire(bus: Bus) -> None:
    keys = [f"value-{uuid.uuid4().hex[:6]}" for _ in range(3)]
    await bus.put_values({})  # nothing to store is not an error
    await bus.put_values({k: k.encode() for k in keys})
    assert [await bus.get_value(k) for k in keys] == [k.encode() for k in keys]
    await bus.put_values({keys[0]: b"short"}, ttl_s=0.1)
    assert await bus.get_value(keys[0]) == b"short"
    await anyio.sleep(0.3)
    assert await bus.get_value(keys[0]) is None
    assert await bus.get_value(keys[1]) == keys[1].encode()


async def test_a_value_given_in_parts_is_stored_joined(bus: Bus) -> None:
    key = f"value-{uuid.uuid4().hex[:6]}"
    await bus.put_values_in_parts({key: [b'{"a": ', b"1", b"}"]}, ttl_s=60)
    assert await bus.get_value(key) == b'{"a": 1}'
    await bus.put_values_in_parts({key: []})
    assert await bus.get_value(key) == b""


async def test_a_value_over_what_its_reader_takes_is_refused_and_a_deleted_one_is_gone(bus: Bus) -> None:
    key = f"value-{uuid.uuid4().hex[:6]}"
    assert await bus.get_value(key, max_bytes=4) is None
    await bus.put_value(key, b"12345")
    assert await bus.get_value(key, max_bytes=5) == b"12345"
    with pytest.raises(ValueTooLarge, match=rf"value '{key}' is 5 bytes, over the 4 its reader takes"):
        await bus.get_value(key, max_bytes=4)
    await bus.delete_value(key)
    assert await bus.get_value(key) is None
    await bus.delete_value(key)  # nothing there: not an error


async def test_the_first_bytes_of_a_value_are_read_without_the_rest(bus: Bus) -> None:
    key = f"value-{uuid.uuid4().hex[:6]}"
    assert await bus.get_value_prefix(key, 4) is None
    await bus.put_value(key, b"")
    assert await bus.get_value_prefix(key, 4) == b""  # there, and empty
    await bus.put_value(key, b"0123456789")
    assert await bus.get_value_prefix(key, 4) == b"0123"
    assert await bus.get_value_prefix(key, 100) == b"0123456789"


async def test_incarnation_is_stable_while_the_data_lives(bus: Bus) -> None:
    first = await bus.incarnation()
    assert first
    assert await bus.incarnation() == first


async def test_read_returns_the_log_after_an_id_without_consuming(bus: Bus, stream: str) -> None:
    for i in range(3):
        await bus.publish(stream, assign(i))
    first = await bus.read(stream)
    assert [env.task_id for _, env in first] == ["t0", "t1", "t2"]
    later = await bus.read(stream, after=first[0][0])
    assert [env.task_id for _, env in later] == ["t1", "t2"]
    assert await bus.read(stream, after=first[-1][0]) == []
    [d] = await take(bus.consume(stream, group="g", consumer="c"), 1)  # reading took nothing from groups
    assert d.envelope.task_id == "t0"


async def test_read_waits_for_the_next_entry(bus: Bus, stream: str) -> None:
    await bus.publish(stream, assign(0))
    [(last, _)] = await bus.read(stream)

    async def later() -> None:
        await anyio.sleep(0.1)
        await bus.publish(stream, assign(1))

    async with anyio.create_task_group() as tg:
        tg.start_soon(later)
        got = await bus.read(stream, after=last, block_s=5)
    assert [env.task_id for _, env in got] == ["t1"]


async def test_a_receipt_acknowledges_its_entry_without_holding_the_message(bus: Bus, stream: str) -> None:
    await bus.publish_many(stream, [assign(i) for i in range(3)])
    got = await take(bus.consume(stream, group="g", consumer="c"), 3)
    receipts = [d.receipt() for d in got]
    assert [(r.stream, r.group, r.consumer, r.entry_id) for r in receipts] == \
        [(d.stream, d.group, d.consumer, d.entry_id) for d in got]
    assert all(r.frame == b"" and r.envelope.type == "heartbeat" for r in receipts)
    await bus.ack(receipts[0])
    await bus.ack_many(receipts[1:])
    assert await bus.depth(stream, "g") == 0
    assert await nothing_within(bus.consume(stream, group="g", consumer="c2"), bus.settings.lease_s * 2)


async def test_publish_many_keeps_order_and_ack_many_acknowledges_them_all(bus: Bus, stream: str) -> None:
    ids = await bus.publish_many(stream, [assign(i) for i in range(5)])
    assert len(ids) == 5
    got = await take(bus.consume(stream, group="g", consumer="c"), 5)
    assert [d.envelope.task_id for d in got] == [f"t{i}" for i in range(5)]
    await bus.ack_many(got)
    assert await bus.depth(stream, "g") == 0


async def test_publish_each_appends_to_each_stream_in_order(bus: Bus, stream: str) -> None:
    other = f"events.test-{uuid.uuid4().hex[:8]}"
    ids = await bus.publish_each([(stream, assign(0)), (other, assign(1)), (stream, assign(2)), (other, assign(3))])
    assert len(ids) == 4
    assert [env.task_id for _, env in await bus.read(stream)] == ["t0", "t2"]
    assert [env.task_id for _, env in await bus.read(other)] == ["t1", "t3"]
    assert await bus.publish_each([]) == []
    assert len(await bus.publish_each([(stream, assign(4))], ttl_s=60)) == 1  # kept a while: the same write
    assert [env.task_id for _, env in await bus.read(stream)] == ["t0", "t2", "t4"]


async def test_publish_each_sends_nothing_when_one_envelope_is_too_large(bus: Bus, stream: str) -> None:
    huge = Envelope(run_id="r", task_id="big", attempt=1,
                    body=Assign(capability="echo", instruction="x" * (bus.settings.codec.max_frame_bytes + 1)))
    with pytest.raises(FrameTooLarge):
        await bus.publish_each([(stream, assign(0)), (stream, huge)])
    assert await bus.read(stream) == []


async def test_followers_are_the_live_follows_newest_first_within_the_limit(bus: Bus) -> None:
    await bus.follow("run-a", after_seq=0, ttl_s=30)
    await bus.follow("run-b", after_seq=7, ttl_s=30)
    await bus.follow("run-gone", after_seq=3, ttl_s=0.05)
    await anyio.sleep(0.1)
    assert await bus.followers(limit=10) == [("run-b", 7), ("run-a", 0)]
    assert await bus.followers(limit=1) == [("run-b", 7)]
    await bus.follow("run-a", after_seq=0, ttl_s=30)  # renewed: newest again, still one follow
    assert await bus.followers(limit=10) == [("run-a", 0), ("run-b", 7)]


async def test_a_follow_lapses_when_not_renewed(bus: Bus) -> None:
    await bus.follow("run-a", after_seq=2, ttl_s=0.2)
    assert await bus.followers(limit=10) == [("run-a", 2)]
    await anyio.sleep(0.3)
    assert await bus.followers(limit=10) == []
