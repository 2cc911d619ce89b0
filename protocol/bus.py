"""The bus contract, and the in-process ``MemoryBus`` that implements it.

Semantics every bus keeps (``tests/protocol/test_bus_contract.py`` checks them for each):

- Streams with consumer groups: each entry goes to one consumer of a group (competing
  consumers); a group created after entries were published still sees them.
- At-least-once: an entry stays pending, owned by its consumer under a lease, until it is
  acknowledged. A lease not renewed in time lets another consumer reclaim the entry, and its
  delivery count grows.
- ``commit`` publishes a reply and acknowledges the entry in one step, and is refused with
  ``LeaseLost`` when the committing consumer no longer owns the entry (a late worker).
- Poison: an entry delivered more than ``max_deliveries`` times, or a frame that does not
  decode, is moved to the stream's dead-letter list with the reason, never yielded again.
- ``broadcast``/``subscribe``: fan-out for control messages (cancel); every live subscriber
  gets each message published after it subscribed.
- ``follow``/``followers``: a reader of a run's history says it is following, and from which
  ``seq``; the manager mirrors only followed runs' histories to the bus.
"""

from __future__ import annotations

import abc
import contextlib
import heapq
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Self

import anyio
from anyio.streams.memory import MemoryObjectSendStream

from protocol.authority import signer_for
from protocol.codec import Codec
from protocol.envelope import Envelope
from protocol.errors import LeaseLost, ProtocolError, ValueTooLarge
from protocol.messages import Heartbeat

__all__ = ("MAX_FOLLOW_TTL_S", "Bus", "BusSettings", "DeadLetter", "Delivery", "MemoryBus")

MAX_FOLLOW_TTL_S = 60.0  # a follow lasts at most this long unless renewed; longer claims are dropped


@dataclass(frozen=True, slots=True)
class BusSettings:
    """Delivery parameters shared by every bus implementation."""

    lease_s: float = 30.0
    max_deliveries: int = 5
    block_s: float = 1.0
    codec: Codec = field(default_factory=Codec)


@dataclass(frozen=True, slots=True)
class Delivery:
    """One entry handed to one consumer; ``deliveries`` is 1 on the first delivery."""

    stream: str
    group: str
    consumer: str
    entry_id: str
    envelope: Envelope
    deliveries: int
    frame: bytes = field(default=b"", repr=False, compare=False)  # as it arrived, kept if it is dead-lettered

    def receipt(self) -> Delivery:
        """This delivery without its message: enough to ``ack`` it, and small enough to hold by the thousand.

        A consumer that acknowledges in batches after a commit (the manager) holds every entry in the
        meantime; holding the decoded messages too was the largest part of its peak memory. The
        envelope is replaced by an empty one; a receipt is for ``ack``/``ack_many`` only.
        """
        return replace(self, envelope=_NO_MESSAGE, frame=b"")


_NO_MESSAGE = Envelope(sender="receipt", body=Heartbeat())  # what a receipt carries in place of its message


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An entry taken out of circulation, with the reason."""

    stream: str
    entry_id: str
    reason: str
    frame: bytes
    deliveries: int
    time: float


class Bus(abc.ABC):
    """Typed messages over streams with consumer groups, leases and dead letters."""

    settings: BusSettings

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    async def aclose(self) -> None:  # noqa: B027 - an optional hook, empty on purpose
        """Release connections; the default has nothing to release."""

    @abc.abstractmethod
    async def publish(self, stream: str, envelope: Envelope) -> str:
        """Append an envelope to a stream; returns the entry id."""

    @abc.abstractmethod
    async def publish_frame(self, stream: str, frame: bytes) -> str:
        """Append raw bytes (a foreign producer, or a test of poison input)."""

    @abc.abstractmethod
    def consume(self, stream: str, *, group: str, consumer: str) -> AsyncIterator[Delivery]:
        """Yield deliveries for ``consumer`` in ``group``: reclaimed expired entries first, then new ones."""

    @abc.abstractmethod
    async def ack(self, delivery: Delivery) -> None:
        """Acknowledge an entry: it will not be delivered again."""

    async def publish_many(self, stream: str, envelopes: Sequence[Envelope]) -> list[str]:
        """Append several envelopes in order; a bus may send them together. Returns the entry ids."""
        return [await self.publish(stream, envelope) for envelope in envelopes]

    async def publish_each(self, items: Sequence[tuple[str, Envelope]], *, ttl_s: float | None = None) -> list[str]:
        """Append each envelope to its own stream (in order within a stream); a bus may send them together.

        Every envelope is encoded before any is sent, so one that cannot be (``FrameTooLarge``) leaves all
        of them unsent. With ``ttl_s``, each stream written disappears ``ttl_s`` after this write (as
        ``expire`` says). Returns the entry ids.
        """
        ids = [await self.publish_frame(stream, frame) for stream, frame in self._encode_each(items)]
        if ttl_s is not None:
            await self.expire_each(dict.fromkeys(stream for stream, _ in items), ttl_s)
        return ids

    def _encode_each(self, items: Sequence[tuple[str, Envelope]]) -> list[tuple[str, bytes]]:
        """Each envelope encoded (and signed) as its stream asks, all before any is sent."""
        frames = self.settings.codec.encode_many([(envelope, signer_for(stream)) for stream, envelope in items])
        return [(stream, frame) for (stream, _), frame in zip(items, frames, strict=True)]

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        """Acknowledge several entries; a bus may send them together."""
        for delivery in deliveries:
            await self.ack(delivery)

    @abc.abstractmethod
    async def bury(self, delivery: Delivery, reason: str) -> None:
        """Move a decoded entry its consumer cannot handle to the dead letters, with the reason, at once."""

    @abc.abstractmethod
    async def commit(self, delivery: Delivery, stream: str, envelope: Envelope) -> str:
        """Publish ``envelope`` to ``stream`` and acknowledge ``delivery`` atomically; LeaseLost if not owned."""

    @abc.abstractmethod
    async def renew(self, delivery: Delivery) -> None:
        """Extend the lease on an in-flight entry; LeaseLost if it was reclaimed."""

    @abc.abstractmethod
    async def release(self, delivery: Delivery) -> None:
        """Hand an unfinished entry back for prompt redelivery to another consumer (graceful drain)."""

    @abc.abstractmethod
    async def dead_letters(self, stream: str, *, last: int | None = None) -> list[DeadLetter]:
        """The entries moved out of ``stream`` as poison, oldest first (only the newest ``last`` if given)."""

    async def dead_letter_count(self, stream: str) -> int:
        """How many dead letters ``stream`` has; a bus may answer without reading them."""
        return len(await self.dead_letters(stream))

    @abc.abstractmethod
    async def depth(self, stream: str, group: str) -> int:
        """Entries of ``stream`` not yet acknowledged by ``group`` (waiting plus pending)."""

    @abc.abstractmethod
    async def broadcast(self, topic: str, envelope: Envelope) -> None:
        """Send a control message to every current subscriber of ``topic``."""

    @abc.abstractmethod
    async def read(self, stream: str, *, after: str = "0", count: int = 1000,
                   block_s: float = 0.0) -> list[tuple[str, Envelope]]:
        """Entries after entry id ``after``, oldest first, read as a log (no group, nothing acknowledged).

        Waits up to ``block_s`` for the first new entry; entries that do not decode are skipped.
        """

    @abc.abstractmethod
    async def expire(self, stream: str, ttl_s: float) -> None:
        """Let ``stream`` disappear ``ttl_s`` from now (the event log of a finished run)."""

    async def expire_each(self, streams: Iterable[str], ttl_s: float) -> None:
        """``expire`` for several streams; a bus may send them together."""
        for stream in streams:
            await self.expire(stream, ttl_s)

    @abc.abstractmethod
    async def incarnation(self) -> str:
        """An id of the bus's stored data that changes when that data is lost (a broker restarted empty)."""

    @abc.abstractmethod
    async def put_value(self, key: str, value: bytes, *, ttl_s: float | None = None) -> None:
        """Store a small value under ``key`` (run snapshots for ``status``), optionally expiring."""

    async def put_values(self, values: Mapping[str, bytes], *, ttl_s: float | None = None) -> None:
        """Store several values at once (one round trip where the bus can); the same as ``put_value`` for each."""
        for key, value in values.items():
            await self.put_value(key, value, ttl_s=ttl_s)

    async def put_values_in_parts(self, values: Mapping[str, Sequence[bytes]], *, ttl_s: float | None = None) -> None:
        """``put_values`` of each ``b"".join(parts)``, without joining the big ones (a 100,000-task run's summary)
        where the bus can; readers see a key's old value or the whole new one, and writes of one key land in the
        order they were made."""
        await self.put_values({key: b"".join(parts) for key, parts in values.items()}, ttl_s=ttl_s)

    @abc.abstractmethod
    async def get_value(self, key: str, *, max_bytes: int | None = None) -> bytes | None:
        """The value stored under ``key``, or None; ``ValueTooLarge`` (nothing read) when it is over ``max_bytes``."""

    @abc.abstractmethod
    async def get_value_prefix(self, key: str, size: int) -> bytes | None:
        """The first ``size`` bytes of the value under ``key`` (all of it when shorter), or None."""

    @abc.abstractmethod
    async def delete_value(self, key: str) -> None:
        """Remove the value under ``key``, if there is one."""

    @abc.abstractmethod
    async def announce(self, worker: str, capabilities: Iterable[str], *, ttl_s: float) -> None:
        """Say that ``worker`` serves ``capabilities`` for the next ``ttl_s`` seconds (workers repeat it)."""

    @abc.abstractmethod
    async def served(self, capabilities: Iterable[str]) -> dict[str, int]:
        """How many live workers announced each capability (0 for none)."""

    @abc.abstractmethod
    async def follow(self, run_id: str, *, after_seq: int, ttl_s: float) -> None:
        """Say that a reader follows ``run_id``'s history, has it up to ``after_seq``, for ``ttl_s`` (readers repeat it)."""

    @abc.abstractmethod
    async def followers(self, *, limit: int) -> list[tuple[str, int]]:
        """Live follows as (run id, seq the follower has), at most ``limit``, newest first.

        What readers wrote, unchecked beyond its form: the manager decides what to do with it.
        """

    @abc.abstractmethod
    def subscribe(self, topic: str) -> contextlib.AbstractAsyncContextManager[AsyncIterator[Envelope]]:
        """``async with bus.subscribe(topic) as messages``: subscribed on entry, so nothing sent after is missed."""


@dataclass(slots=True)
class _Pending:
    consumer: str
    deadline: float
    deliveries: int


@dataclass(slots=True)
class _Group:
    last_id: int = 0
    pending: dict[int, _Pending] = field(default_factory=dict)
    # (deadline, entry id) of every lease given, soonest first. One whose entry was acknowledged or leased again
    # since is stale, and dropped when it comes up. Scanning every pending entry for an expired lease at each
    # delivery was a tenth of an embedded 5,000-task job's time.
    leases: list[tuple[float, int]] = field(default_factory=list)

    def lease(self, entry_id: int, p: _Pending, deadline: float) -> None:
        """Set the pending entry's lease to end at ``deadline`` (monotonic seconds; 0 for now)."""
        p.deadline = deadline
        heapq.heappush(self.leases, (deadline, entry_id))
        self._compact()

    def settle(self, entry_id: int) -> None:
        """The entry is acknowledged (or dead-lettered): no longer pending."""
        self.pending.pop(entry_id, None)
        self._compact()

    def _compact(self) -> None:
        if len(self.leases) > 2 * len(self.pending) + 64:  # mostly stale: memory follows the work in flight
            self.leases = [(q.deadline, i) for i, q in self.pending.items()]
            heapq.heapify(self.leases)

    def next_expired(self, now: float) -> tuple[int, _Pending] | None:
        """A pending entry whose lease ended by ``now``, soonest ended first, or None."""
        leases = self.leases
        while leases and leases[0][0] <= now:
            deadline, entry_id = heapq.heappop(leases)
            p = self.pending.get(entry_id)
            if p is not None and p.deadline == deadline:
                return entry_id, p
        return None

    def next_deadline(self) -> float | None:
        """When the soonest lease of a pending entry ends, or None when nothing is pending."""
        leases = self.leases
        while leases:
            deadline, entry_id = leases[0]
            p = self.pending.get(entry_id)
            if p is not None and p.deadline == deadline:
                return deadline
            heapq.heappop(leases)
        return None


@dataclass(slots=True)
class _Stream:
    entries: dict[int, bytes] = field(default_factory=dict)
    last_id: int = 0
    groups: dict[str, _Group] = field(default_factory=dict)
    dead: list[DeadLetter] = field(default_factory=list)
    changed: anyio.Event = field(default_factory=anyio.Event)

    def notify(self) -> None:
        self.changed.set()
        self.changed = anyio.Event()


class MemoryBus(Bus):
    """An in-process bus with the same semantics as the Redis bus: for embedding and tests."""

    def __init__(self, settings: BusSettings | None = None) -> None:
        self.settings = settings or BusSettings()
        self._streams: dict[str, _Stream] = {}
        self._subscribers: dict[str, set[MemoryObjectSendStream[Envelope]]] = {}
        self._values: dict[str, tuple[bytes, float | None]] = {}
        self._presence: dict[str, dict[str, float]] = {}  # capability -> worker -> monotonic expiry
        self._follows: dict[tuple[str, int], float] = {}  # (run id, seq the follower has) -> monotonic expiry
        self._incarnation = uuid.uuid4().hex

    def _stream(self, name: str) -> _Stream:
        return self._streams.setdefault(name, _Stream())

    async def publish(self, stream: str, envelope: Envelope) -> str:
        return await self.publish_frame(stream, self.settings.codec.encode(envelope, signer=signer_for(stream)))

    async def publish_frame(self, stream: str, frame: bytes) -> str:
        s = self._stream(stream)
        s.last_id += 1
        s.entries[s.last_id] = bytes(frame)
        s.notify()
        await anyio.lowlevel.checkpoint()
        return str(s.last_id)

    async def consume(self, stream: str, *, group: str, consumer: str) -> AsyncIterator[Delivery]:
        s = self._stream(stream)
        g = s.groups.setdefault(group, _Group())
        while True:
            delivery = self._reclaim(stream, s, group, g, consumer) or self._next_new(stream, s, group, g, consumer)
            if delivery is not None:
                yield delivery
                continue
            wait = self.settings.block_s
            if (deadline := g.next_deadline()) is not None:
                wait = max(0.0, min(wait, deadline - time.monotonic()))
            with anyio.move_on_after(wait):
                await s.changed.wait()

    def _reclaim(self, name: str, s: _Stream, group: str, g: _Group, consumer: str) -> Delivery | None:
        now = time.monotonic()
        while (expired := g.next_expired(now)) is not None:
            entry_id, p = expired
            p.deliveries += 1
            if p.deliveries > self.settings.max_deliveries:
                self._dead_letter(name, s, g, entry_id, p.deliveries - 1,
                                  f"delivered {p.deliveries - 1} times without acknowledgement "
                                  f"(last consumer {p.consumer!r})")
                continue
            p.consumer = consumer
            g.lease(entry_id, p, now + self.settings.lease_s)
            delivery = self._deliver(name, s, group, g, entry_id, p)
            if delivery is not None:
                return delivery
        return None

    def _next_new(self, name: str, s: _Stream, group: str, g: _Group, consumer: str) -> Delivery | None:
        while g.last_id < s.last_id:
            g.last_id += 1
            if g.last_id not in s.entries:  # acknowledged by every group and dropped
                continue
            p = g.pending[g.last_id] = _Pending(consumer, 0.0, 1)
            g.lease(g.last_id, p, time.monotonic() + self.settings.lease_s)
            delivery = self._deliver(name, s, group, g, g.last_id, p)
            if delivery is not None:
                return delivery
        return None

    def _deliver(self, name: str, s: _Stream, group: str, g: _Group, entry_id: int, p: _Pending) -> Delivery | None:
        try:
            envelope = self.settings.codec.decode(s.entries[entry_id], stream=name)
        except ProtocolError as exc:
            self._dead_letter(name, s, g, entry_id, p.deliveries, f"undecodable frame: {exc}")
            return None
        return Delivery(name, group, p.consumer, str(entry_id), envelope, p.deliveries, s.entries[entry_id])

    def _dead_letter(self, name: str, s: _Stream, g: _Group, entry_id: int, deliveries: int, reason: str) -> None:
        s.dead.append(DeadLetter(name, str(entry_id), reason, s.entries.get(entry_id, b""), deliveries, time.time()))
        self._ack(s, g, entry_id)

    def _ack(self, s: _Stream, g: _Group, entry_id: int) -> None:
        g.settle(entry_id)
        # Drop the entry once no group still needs it, so memory follows work in flight.
        if all(entry_id <= other.last_id and entry_id not in other.pending for other in s.groups.values()):
            s.entries.pop(entry_id, None)

    def _owned(self, delivery: Delivery) -> tuple[_Stream, _Group, int, _Pending]:
        s = self._stream(delivery.stream)
        g = s.groups.get(delivery.group)
        entry_id = int(delivery.entry_id)
        p = g.pending.get(entry_id) if g else None
        if g is None or p is None or p.consumer != delivery.consumer or p.deliveries != delivery.deliveries:
            raise LeaseLost(f"{delivery.consumer!r} no longer owns entry {delivery.entry_id} of {delivery.stream!r}")
        return s, g, entry_id, p

    async def bury(self, delivery: Delivery, reason: str) -> None:
        s = self._stream(delivery.stream)
        g = s.groups.get(delivery.group)
        if g is not None and int(delivery.entry_id) in g.pending:
            self._dead_letter(delivery.stream, s, g, int(delivery.entry_id), delivery.deliveries, reason)

    async def ack(self, delivery: Delivery) -> None:
        s = self._stream(delivery.stream)
        g = s.groups.get(delivery.group)
        if g is not None:
            self._ack(s, g, int(delivery.entry_id))
        await anyio.lowlevel.checkpoint()

    async def commit(self, delivery: Delivery, stream: str, envelope: Envelope) -> str:
        frame = self.settings.codec.encode(envelope, signer=signer_for(stream))
        s, g, entry_id, _ = self._owned(delivery)
        self._ack(s, g, entry_id)
        return await self.publish_frame(stream, frame)

    async def renew(self, delivery: Delivery) -> None:
        _, g, entry_id, p = self._owned(delivery)
        g.lease(entry_id, p, time.monotonic() + self.settings.lease_s)
        await anyio.lowlevel.checkpoint()

    async def release(self, delivery: Delivery) -> None:
        with contextlib.suppress(LeaseLost):
            s, g, entry_id, p = self._owned(delivery)
            g.lease(entry_id, p, 0.0)
            s.notify()
        await anyio.lowlevel.checkpoint()

    async def dead_letters(self, stream: str, *, last: int | None = None) -> list[DeadLetter]:
        await anyio.lowlevel.checkpoint()
        dead = self._stream(stream).dead
        return list(dead if last is None else dead[len(dead) - last:] if last > 0 else [])

    async def depth(self, stream: str, group: str) -> int:
        await anyio.lowlevel.checkpoint()
        s = self._stream(stream)
        g = s.groups.get(group)
        if g is None:
            return len(s.entries)
        return sum(1 for i in s.entries if i > g.last_id) + len(g.pending)

    async def broadcast(self, topic: str, envelope: Envelope) -> None:
        self.settings.codec.encode(envelope, signer=signer_for(topic))  # same size and encodability checks as the wire
        for send in list(self._subscribers.get(topic, ())):
            with contextlib.suppress(anyio.WouldBlock, anyio.BrokenResourceError):
                send.send_nowait(envelope)
        await anyio.lowlevel.checkpoint()

    async def read(self, stream: str, *, after: str = "0", count: int = 1000,
                   block_s: float = 0.0) -> list[tuple[str, Envelope]]:
        s = self._stream(stream)
        start = int(after) if after.isdigit() else 0
        if s.last_id <= start and block_s > 0:
            with anyio.move_on_after(block_s):
                await s.changed.wait()
        out: list[tuple[str, Envelope]] = []
        for entry_id in range(start + 1, s.last_id + 1):
            frame = s.entries.get(entry_id)
            if frame is None:
                continue
            try:
                out.append((str(entry_id), self.settings.codec.decode(frame, stream=stream)))
            except ProtocolError:
                continue
            if len(out) == count:
                break
        await anyio.lowlevel.checkpoint()
        return out

    async def expire(self, stream: str, ttl_s: float) -> None:
        # In process, a finished run's log lives as long as the bus; nothing to schedule.
        await anyio.lowlevel.checkpoint()

    async def expire_each(self, streams: Iterable[str], ttl_s: float) -> None:
        # Nothing to schedule either, and one turn of the loop for all: the manager's history mirror asks
        # this for every run written in each commit.
        await anyio.lowlevel.checkpoint()

    async def incarnation(self) -> str:
        await anyio.lowlevel.checkpoint()
        return self._incarnation

    async def put_value(self, key: str, value: bytes, *, ttl_s: float | None = None) -> None:
        self._values[key] = (bytes(value), None if ttl_s is None else time.monotonic() + ttl_s)
        await anyio.lowlevel.checkpoint()

    def _live_value(self, key: str) -> bytes | None:
        value, expires = self._values.get(key, (None, None))
        if expires is not None and expires <= time.monotonic():
            self._values.pop(key, None)
            return None
        return value

    async def get_value(self, key: str, *, max_bytes: int | None = None) -> bytes | None:
        await anyio.lowlevel.checkpoint()
        value = self._live_value(key)
        if value is not None and max_bytes is not None and len(value) > max_bytes:
            raise ValueTooLarge(f"value {key!r} is {len(value)} bytes, over the {max_bytes} its reader takes")
        return value

    async def get_value_prefix(self, key: str, size: int) -> bytes | None:
        await anyio.lowlevel.checkpoint()
        value = self._live_value(key)
        return None if value is None else value[:size]

    async def delete_value(self, key: str) -> None:
        self._values.pop(key, None)
        await anyio.lowlevel.checkpoint()

    async def announce(self, worker: str, capabilities: Iterable[str], *, ttl_s: float) -> None:
        expires = time.monotonic() + ttl_s
        for capability in capabilities:
            self._presence.setdefault(capability, {})[worker] = expires
        await anyio.lowlevel.checkpoint()

    async def served(self, capabilities: Iterable[str]) -> dict[str, int]:
        await anyio.lowlevel.checkpoint()
        now = time.monotonic()
        return {c: sum(expiry > now for expiry in self._presence.get(c, {}).values()) for c in capabilities}

    async def follow(self, run_id: str, *, after_seq: int, ttl_s: float) -> None:
        self._follows[(run_id, after_seq)] = time.monotonic() + min(ttl_s, MAX_FOLLOW_TTL_S)
        await anyio.lowlevel.checkpoint()

    async def followers(self, *, limit: int) -> list[tuple[str, int]]:
        await anyio.lowlevel.checkpoint()
        now = time.monotonic()
        self._follows = {follow: expiry for follow, expiry in self._follows.items() if expiry > now}
        return sorted(self._follows, key=self._follows.__getitem__, reverse=True)[:limit]

    @contextlib.asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[AsyncIterator[Envelope]]:
        send, receive = anyio.create_memory_object_stream[Envelope](max_buffer_size=1024)
        subscribers = self._subscribers.setdefault(topic, set())
        subscribers.add(send)
        try:
            async with receive:
                yield receive
        finally:
            subscribers.discard(send)
            send.close()
