"""``RedisBus``: the :class:`~protocol.bus.Bus` contract over Redis Streams and consumer groups.

Key layout (``ns`` is :attr:`RedisSettings.namespace`, default ``orch``)::

    tasks.<cap>      -> ns:{cap.<cap>}:tasks         stream, one consumer group per reader set
    results.<cap>    -> ns:{cap.<cap>}:results
    <stream> dead    -> <stream key>:dead            dead letters of that stream (same hash tag)
    other names      -> ns:{s.<name>}:stream
    topic            -> ns:ctl:<topic>               Pub/Sub channel (control messages only)

A capability's task, result and dead-letter streams share the ``{cap.<cap>}`` hash tag, hence
one Cluster slot, so ``commit`` (reply XADD + XACK) is one legal atomic script there.

Delivery is at-least-once. ``consume`` reclaims entries idle past the lease (dead-lettering
those delivered ``max_deliveries`` times) before reading new ones; ``commit``, ``renew`` and
``release`` are Lua scripts that first check the entry is still pending for this consumer with
the same delivery count (fencing). Acknowledged entries are deleted once no group needs them.
See ``docs/bus.md``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Self, TypeVar, cast

import anyio
import redis.asyncio as aioredis
import structlog
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthorizationError,
    NoPermissionError,
    NoScriptError,
    ReadOnlyError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from protocol import _redis_lua as lua
from protocol._read_deadlines import ReadDeadlines
from protocol.authority import signer_for
from protocol.bus import MAX_FOLLOW_TTL_S, Bus, BusSettings, DeadLetter, Delivery
from protocol.codec import Codec
from protocol.envelope import Envelope
from protocol.errors import BusError, BusUnavailable, LeaseLost, ProtocolError, ValueTooLarge
from protocol.outage import Backoff, Outage
from protocol.settings import RedisSettings

__all__ = ("RedisBus",)

log = structlog.get_logger(__name__)

T = TypeVar("T")

_RETRYABLE = (RedisConnectionError, RedisTimeoutError, OSError)  # BusyLoadingError (LOADING) is a ConnectionError
# Replies that mean "this server cannot serve you right now" during a restart or failover: a blocked
# XREADGROUP force-unblocked, a demoted primary, a replica without a primary, a cluster slot in migration.
_TRANSIENT_REPLIES = ("UNBLOCKED", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN")


def _transient(reply: object) -> bool:
    """True for an error reply that a retry after a short wait can cure."""
    return isinstance(reply, ReadOnlyError) or (
        isinstance(reply, ResponseError) and str(reply).startswith(_TRANSIENT_REPLIES))


def _forbidden(reply: ResponseError) -> bool:
    """True when the ACL user lacks a command, key or channel (sent directly or called by a script)."""
    return isinstance(reply, NoPermissionError) or "can't run this command" in str(reply)


_RELEASE_IDLE_MS = 365 * 24 * 3600 * 1000  # far past any lease a reclaimer could use
_STAGING_TTL_MS = 10 * 60 * 1000  # a writer that dies mid-value leaves its staging key for this long


def _at_most(parts: Sequence[bytes], limit: int) -> bool:
    """Whether ``parts`` hold at most ``limit`` bytes, reading no more of them than it takes to tell."""
    size = 0
    for part in parts:
        size += len(part)
        if size > limit:
            return False
    return True


def _pieces(parts: Sequence[bytes], limit: int) -> Iterable[bytes]:
    """``parts`` joined into pieces of at most ``limit`` bytes (small parts together, a big one sliced)."""
    batch: list[bytes] = []
    size = 0
    for part in parts:
        if size + len(part) > limit and batch:
            yield b"".join(batch)
            batch, size = [], 0
        if len(part) > limit:
            yield from (part[i:i + limit] for i in range(0, len(part), limit))
            continue
        batch.append(part)
        size += len(part)
    if batch:
        yield b"".join(batch)


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _frame(fields: Any) -> bytes:
    """The ``f`` field of a stream entry's raw field list (``b""`` when it has none)."""
    if not fields:
        return b""
    if isinstance(fields, dict):
        return bytes(fields.get(b"f", b""))
    for i in range(0, len(fields) - 1, 2):  # every entry the bus writes has ``f`` first (and alone)
        if fields[i] == b"f":
            return bytes(fields[i + 1])
    return b""


@dataclass(frozen=True, slots=True)
class _Unencoded:
    """An envelope a write carries, encoded when its batch is sent (with the batch's other envelopes).

    Envelopes are frozen, but the data in a body is not: what a publisher passes must not change until its
    publish returns (the frame is made from it then, not at the call, when a batch is in flight)."""

    envelope: Envelope
    signer: str | None


class _Op:
    __slots__ = ("done", "error", "item", "result", "unencoded")

    def __init__(self, item: tuple[Any, ...] | _Unencoded) -> None:
        # The script's arguments for this write; for an envelope, its frame, once the batch is encoded.
        self.unencoded = item if isinstance(item, _Unencoded) else None
        self.item: tuple[Any, ...] = () if isinstance(item, _Unencoded) else item
        self.result: Any = None
        self.error: BaseException | None = None
        self.done = False


_MAX_ITEMS = 256  # per script call, so one call never holds the server for long


class _Batcher:
    """Group commit: concurrent writes share one pipelined round trip on one connection.

    A caller queues its item; if no batch is in flight it sends everything queued so far,
    otherwise it waits for the batch in flight to finish and looks again. Items for the same
    script, keys and fixed arguments become one EVALSHA (the scripts loop over their items),
    and all of those go in one pipeline. An attempt to send a batch always completes (shielded,
    bounded by the socket timeouts); a caller cancelled while its item still waits in the queue
    withdraws it, and a sender cancelled while it waits out an outage between attempts
    withdraws its own items and leaves the others queued for their callers to send.

    The batcher holds one pooled connection for the life of the bus (taken at the first write,
    given back by ``RedisBus.aclose``) and writes the packed commands on it directly, skipping
    redis-py's per-command pool checkout and pipeline machinery. A connection error disconnects
    it, so the retry (``RedisBus._call``) reconnects; one the server closed while it sat idle is
    reconnected before use, as the pool would.
    """

    def __init__(self, bus: RedisBus) -> None:
        self._bus = bus
        self._queue: dict[tuple[Any, ...], list[_Op]] = {}
        self._busy = False  # a batch is in flight
        self._idle: anyio.Event | None = None  # made only when someone waits for the batch in flight
        self._conn: Any = None  # redis.asyncio.Connection, held while the bus is open

    async def run(self, script: lua.Script, keys: tuple[str, ...], fixed: tuple[Any, ...],
                  item: tuple[Any, ...] | _Unencoded) -> Any:
        [result] = await self.run_many([(script, keys, fixed, item)])
        return result

    async def run_many(self, writes: Sequence[tuple[lua.Script, tuple[str, ...], tuple[Any, ...],
                                                    tuple[Any, ...] | _Unencoded]]) -> list[Any]:
        """Queue several writes at once (one caller, one wait) and return their results in order."""
        ops: list[tuple[tuple[Any, ...], _Op]] = []
        for script, keys, fixed, item in writes:
            group = (script, keys, fixed)
            op = _Op(item)
            self._queue.setdefault(group, []).append(op)
            ops.append((group, op))
        while not all(op.done for _, op in ops):
            if self._busy:
                try:
                    await self._answered()
                except BaseException:
                    for group, op in ops:
                        queued = self._queue.get(group, [])
                        if op in queued:  # not sent yet: withdraw it
                            queued.remove(op)
                    raise
                continue
            self._busy = True
            batch, self._queue = self._queue, {}
            try:
                await self._flush(batch)
            except anyio.get_cancelled_exc_class():
                # Cancelled while waiting out an outage between attempts (the attempts themselves are
                # shielded), so the batch is as good as not sent: withdraw our own items and put the
                # other callers' back at the head of the queue for the next of them to send.
                mine = [op for _, op in ops]
                for group, queued in batch.items():
                    if rest := [op for op in queued if op not in mine and not op.done]:
                        self._queue[group] = rest + self._queue.get(group, [])
                raise
            except BaseException as exc:
                # Whatever else went wrong, every caller of the batch hears it: an item left undone would
                # have its caller wait for a batch that is gone (and loop without ever yielding).
                for queued in batch.values():
                    for op in queued:
                        if not op.done:
                            op.error, op.done = exc, True
                raise
            finally:
                self._busy = False
                if self._idle is not None:
                    finished, self._idle = self._idle, None
                    finished.set()
        failed = [(script, op.error) for (script, *_), op in ops if op.error is not None]
        if not failed:
            return [op.result for _, op in ops]
        script, error = failed[0]
        del failed
        for _, op in ops:
            op.error = None
        try:
            if isinstance(error, ResponseError) and _forbidden(error):
                raise self._bus._forbidden_error(script.name, error) from error
            raise error
        finally:
            # Nothing in this frame (which the error's traceback holds) leads back to the error: a cycle
            # through them kept the writes' envelopes and frames alive until a full collection.
            del error

    async def _flush(self, batch: dict[tuple[Any, ...], list[_Op]]) -> None:
        self._encode(batch)
        calls: list[tuple[lua.Script, tuple[str, ...], tuple[Any, ...], list[_Op]]] = []
        for (script, keys, fixed), all_ops in batch.items():
            ops = [op for op in all_ops if not op.done]  # not those that could not be encoded
            for i in range(0, len(ops), _MAX_ITEMS):
                calls.append((script, keys, fixed, ops[i:i + _MAX_ITEMS]))
        if not calls:
            return
        try:
            replies = await self._bus._call("write", lambda: self._send(calls), shield_attempts=True)
        except anyio.get_cancelled_exc_class():
            raise  # the flusher was cancelled between attempts: run_many re-queues the others' items
        except BaseException as exc:  # BusUnavailable: every caller learns it
            for *_, ops in calls:
                for op in ops:
                    op.error, op.done = exc, True
            raise
        for (*_, ops), reply in zip(calls, replies, strict=True):
            for i, op in enumerate(ops):
                if isinstance(reply, BaseException):
                    op.error = reply
                else:
                    op.result = reply[i]
                op.done = True

    def _encode(self, batch: dict[tuple[Any, ...], list[_Op]]) -> None:
        """Encode the batch's envelopes together; one that cannot be is done, with its error, and not sent."""
        unencoded = [(op, op.unencoded) for queued in batch.values() for op in queued if op.unencoded is not None]
        if not unencoded:
            return
        codec = self._bus.settings.codec
        ops = [op for op, _ in unencoded]
        pairs = [(item.envelope, item.signer) for _, item in unencoded]
        frames: list[bytes | BaseException]
        try:
            frames = list(codec.encode_each(pairs))
        except Exception:  # not a ProtocolError (a body the serializer refuses): find whose, one by one
            frames = [_encoded_or_error(codec, envelope, signer) for envelope, signer in pairs]
        for op, frame in zip(ops, frames, strict=True):
            op.unencoded = None
            if isinstance(frame, BaseException):
                op.error, op.done = frame, True
            else:
                op.item = (frame,)

    async def _send(self, calls: list[tuple[lua.Script, tuple[str, ...], tuple[Any, ...], list[_Op]]]) -> list[Any]:
        bus = self._bus
        commands = [("EVALSHA", bus._sha[script.name], len(keys), *keys, *fixed, *(a for op in ops for a in op.item))
                    for script, keys, fixed, ops in calls]
        conn = self._conn
        if conn is None:
            conn = self._conn = await bus._hold_connection()
        for attempt in range(2):
            replies = await _roundtrip(conn, commands, bus._deadlines)
            if attempt or not any(isinstance(r, NoScriptError) for r in replies):
                break
            await bus._load_scripts()  # a restarted or failed-over Redis lost its script cache
        if all(_transient(r) for r in replies):
            raise replies[0]  # nothing was applied (e.g. READONLY after a failover): _call retries the batch
        return replies

    @property
    def busy(self) -> bool:
        """Whether a batch is in flight."""
        return self._busy

    async def settled(self) -> None:
        """Return once no batch is in flight (at once when none is). Under steady writes that can be never:
        the caller bounds the wait."""
        while self._busy:
            await self._answered()

    async def _answered(self) -> None:
        """Wait for the batch in flight to be answered."""
        if self._idle is None:
            self._idle = anyio.Event()
        await self._idle.wait()

    async def aclose(self) -> None:
        """Give the held connection back to the pool (the bus is closing)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._bus._return_connection(conn)


def _encoded_or_error(codec: Codec, envelope: Envelope, signer: str | None) -> bytes | BaseException:
    try:
        return codec.encode(envelope, signer=signer)
    except Exception as exc:  # its publisher gets it; the batch's others are sent
        return exc.with_traceback(None)  # a traceback held here is a cycle back to the envelope and its encoding


def _seconds(ttl_s: float) -> int:
    """A time to live as Redis's EXPIRE takes it: whole seconds, at least one."""
    return max(1, int(ttl_s))


_INLINE_MAX = 6000  # longer values go out as buffers of their own, uncopied (redis-py's cutoff too)


def _pack(commands: Sequence[tuple[Any, ...]]) -> list[bytes] | None:
    """``commands`` (names without spaces) in the Redis protocol, for str, bytes and int arguments; else None.

    The same bytes as redis-py's ``Connection.pack_commands`` for those types (str as UTF-8), at a
    fraction of the cost; other types (floats, memoryviews, bools, which redis-py refuses) go to it.
    """
    out: list[bytes] = []
    buf: list[bytes] = []
    for args in commands:
        buf.append(b"*%d\r\n" % len(args))
        for arg in args:
            kind = type(arg)
            if kind is str:
                arg = arg.encode()
            elif kind is int:
                arg = b"%d" % arg
            elif kind is not bytes:
                return None
            size = len(arg)
            if size > _INLINE_MAX:
                buf.append(b"$%d\r\n" % size)
                out.append(b"".join(buf))
                out.append(arg)
                buf = [b"\r\n"]
            else:
                buf.append(b"$%d\r\n%s\r\n" % (size, arg))
    out.append(b"".join(buf))
    return out


async def _roundtrip(conn: Any, commands: Sequence[tuple[Any, ...]], deadlines: ReadDeadlines) -> list[Any]:
    """Send ``commands`` in one write on a held connection and read every reply (error replies as values).

    Each reply waits at most the connection's socket timeout, as ``deadlines`` time it (without a timer per
    reply; where the URL sets a health check interval, redis-py reads and times them as it does itself). Any failure part way (connection
    lost, timeout, cancellation) disconnects ``conn``, so what is left unread on the socket can never be taken
    for the next command's reply; the next send reconnects.
    """
    if conn.is_connected and conn._reader.at_eof():  # closed by the server while idle: reconnect first
        await conn.disconnect()
    try:
        packed = _pack(commands) or conn.pack_commands(commands)
        if not conn.is_connected or conn._writer.transport.is_closing() or conn.health_check_interval:
            # redis-py's own send: it connects first, times out as configured, and runs the health
            # check a URL's ``health_check_interval`` asks for.
            await conn.send_packed_command(packed)
        else:
            # redis-py's send wraps every write in asyncio.wait_for, a task per command. The socket
            # nearly always takes the whole write at once; only wait (bounded) when some is left.
            writer = conn._writer
            writer.writelines(packed)
            if writer.transport.get_write_buffer_size():
                try:
                    with anyio.fail_after(conn.socket_timeout):
                        await writer.drain()
                except TimeoutError:
                    raise RedisTimeoutError("Timeout writing to socket") from None
                except OSError as exc:
                    raise RedisConnectionError(f"Error while writing to socket: {exc}") from exc
        timeout = conn.socket_timeout
        if timeout is None or conn.health_check_interval:
            replies: list[Any] = []
            for _ in commands:
                try:
                    replies.append(await conn.read_response())
                except ResponseError as exc:
                    replies.append(exc)
        else:
            replies = await _read_replies(conn, len(commands), timeout, deadlines)
    except BaseException:
        await conn.disconnect(nowait=True)
        raise
    return replies


async def _read_replies(conn: Any, count: int, timeout_s: float, deadlines: ReadDeadlines) -> list[Any]:
    """``count`` replies straight from the connection's parser (as redis-py's ``read_response`` reads them, less
    its timer per reply), error replies as values; a reply awaited over ``timeout_s`` seconds is a timeout."""
    parser = conn._parser
    replies: list[Any] = []
    try:
        for _ in range(count):
            deadlines.waiting(conn, timeout_s)
            try:
                replies.append(await parser.read_response())
            except OSError as exc:
                raise RedisConnectionError(f"Error while reading from {conn._host_error()}: {exc.args}") from exc
    except BaseException:
        if deadlines.done(conn):  # the connection was closed under the read because it waited too long
            raise RedisTimeoutError(f"Timeout reading from {conn._host_error()}") from None
        raise
    deadlines.done(conn)
    return replies


class RedisBus(Bus):
    """A bus over Redis Streams; ``async with RedisBus.from_url(url) as bus``."""

    def __init__(self, redis_settings: RedisSettings | None = None, settings: BusSettings | None = None) -> None:
        self.settings = settings or BusSettings()
        self.redis_settings = rs = redis_settings or RedisSettings()
        self._redis: aioredis.Redis = aioredis.Redis.from_url(
            rs.url,
            decode_responses=False,
            socket_connect_timeout=rs.connect_timeout_s,
            socket_timeout=rs.socket_timeout_s + self.settings.block_s,
            retry=Retry(NoBackoff(), 0),  # one retry policy, ours: see _call
            max_connections=rs.max_connections,
            client_name=f"orchestrator-bus-{rs.namespace}",
        )
        self._sha = {script.name: hashlib.sha1(script.source.encode()).hexdigest() for script in lua.ALL}
        self._groups: set[tuple[str, str]] = set()
        self._writes = _Batcher(self)
        self._deadlines = ReadDeadlines()  # replies on the connections held by the batcher and the consumers
        self._value_locks: dict[str, anyio.Lock] = {}  # keys with a value being written in pieces
        self._outage = Outage(rs.safe_url, limit_s=rs.retry_budget_s)

    async def _hold_connection(self) -> Any:
        """A connected connection taken from the pool, for a caller that keeps it (see _roundtrip)."""
        return await self._redis.connection_pool.get_connection()  # type: ignore[no-untyped-call]

    async def _return_connection(self, conn: Any) -> None:
        self._deadlines.forget(conn)
        await self._redis.connection_pool.release(conn)

    async def _load_scripts(self) -> None:
        for script in lua.ALL:
            await self._redis.script_load(script.source)

    async def _eval(self, script: lua.Script, keys: list[str], args: list[Any]) -> Any:
        """One unbatched script call, loading the scripts when Redis lost them."""
        try:
            return await self._redis.evalsha(self._sha[script.name], len(keys), *keys, *args)
        except NoScriptError:
            await self._load_scripts()
            return await self._redis.evalsha(self._sha[script.name], len(keys), *keys, *args)

    @classmethod
    def from_url(cls, url: str, *, settings: BusSettings | None = None, namespace: str = "orch",
                 **redis_overrides: Any) -> Self:
        """A bus on ``url`` (``redis://`` or ``rediss://``, password in the URL if any)."""
        return cls(RedisSettings.from_url(url, namespace=namespace, **redis_overrides), settings)

    async def aclose(self) -> None:
        """Close every pooled connection."""
        with anyio.CancelScope(shield=True):
            await self._writes.aclose()
            await self._redis.aclose()

    # -- names ---------------------------------------------------------------------------------

    def key(self, stream: str) -> str:
        """The Redis key of a logical stream name (see the module docstring)."""
        ns = self.redis_settings.namespace
        kind, _, cap = stream.partition(".")
        if kind in ("tasks", "results") and cap:
            return f"{ns}:{{cap.{cap}}}:{kind}"
        return f"{ns}:{{s.{stream}}}:stream"

    def dead_key(self, stream: str) -> str:
        """The Redis key of a stream's dead letters."""
        return self.key(stream) + ":dead"

    def channel(self, topic: str) -> str:
        """The Pub/Sub channel of a control topic."""
        return f"{self.redis_settings.namespace}:ctl:{topic}"

    # -- retries -------------------------------------------------------------------------------

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]], *, shield_attempts: bool = False) -> T:
        """Run ``fn``, retrying connection failures with capped, jittered exponential backoff.

        Retries go on for as long as Redis stays unreachable, or until the outage has lasted
        ``retry_budget_s`` (then ``BusUnavailable``). The waits between attempts are always
        cancellable; with ``shield_attempts`` each attempt itself is not (a write that was sent
        is allowed to finish, bounded by the socket timeouts).
        """
        rs = self.redis_settings
        backoff = Backoff(rs.backoff_base_s, rs.backoff_cap_s)
        while True:
            started = self._outage.clock()
            try:
                if shield_attempts:
                    with anyio.CancelScope(shield=True):
                        result = await fn()
                else:
                    result = await fn()
            except (AuthenticationError, AuthorizationError) as exc:
                # Waiting will not fix a wrong password or a missing ACL grant: say so at once.
                raise BusUnavailable(f"Redis at {rs.safe_url!r} refused the credentials for {what}: {exc}") from exc
            except (*_RETRYABLE, ResponseError) as exc:
                if isinstance(exc, ResponseError) and _forbidden(exc):
                    raise self._forbidden_error(what, exc) from exc
                if isinstance(exc, ResponseError) and not _transient(exc):
                    raise
                await anyio.sleep(self._outage.failed(what, exc, started=started, backoff=backoff))
            else:
                self._outage.recovered()
                return result

    def _forbidden_error(self, what: str, exc: ResponseError) -> BusError:
        # Waiting will not grant a permission either; name the operation and where the grants are listed.
        return BusError(f"the Redis user at {self.redis_settings.safe_url!r} may not {what}: {exc} (the grants "
                        "a user needs are in docs/bus.md, 'ACL grants')")

    async def _ensure_group(self, key: str, group: str, *, force: bool = False) -> None:
        if (key, group) in self._groups and not force:
            return
        try:
            await self._redis.xgroup_create(key, group, id="0", mkstream=True)
            if force:
                log.warning("redis_group_recreated", key=key, group=group)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._groups.add((key, group))

    # -- publishing ----------------------------------------------------------------------------

    async def publish(self, stream: str, envelope: Envelope) -> str:
        limit = self.redis_settings.max_task_stream_len
        if limit is not None and stream.startswith("tasks."):  # back-pressure: encoded once, written until it fits
            return await self.publish_frame(stream, self.settings.codec.encode(envelope, signer=signer_for(stream)))
        return _s(await self._writes.run(lua.PUBLISH, (self.key(stream),), (0, 0), _Unencoded(envelope, signer_for(stream))))

    async def publish_many(self, stream: str, envelopes: Sequence[Envelope]) -> list[str]:
        if not envelopes:
            return []
        key, limit = self.key(stream), self.redis_settings.max_task_stream_len
        if limit is not None and stream.startswith("tasks."):
            return await super().publish_many(stream, envelopes)  # back-pressure is per message
        frames = self.settings.codec.encode_many([(envelope, signer_for(stream)) for envelope in envelopes])
        ids = await self._writes.run_many([(lua.PUBLISH, (key,), (0, 0), (frame,)) for frame in frames])
        return [_s(entry_id) for entry_id in ids]

    async def publish_each(self, items: Sequence[tuple[str, Envelope]], *, ttl_s: float | None = None) -> list[str]:
        limit = self.redis_settings.max_task_stream_len
        if limit is not None and any(stream.startswith("tasks.") for stream, _ in items):
            return await super().publish_each(items, ttl_s=ttl_s)  # back-pressure is per message
        # The expiry rides on the write: a run's history mirror took a call of its own per run to expire.
        keep = 0 if ttl_s is None else _seconds(ttl_s)
        ids = await self._writes.run_many([(lua.PUBLISH, (self.key(stream),), (0, keep), (frame,))
                                           for stream, frame in self._encode_each(items)])
        return [_s(entry_id) for entry_id in ids]

    async def publish_frame(self, stream: str, frame: bytes) -> str:
        key = self.key(stream)
        limit = self.redis_settings.max_task_stream_len
        if limit is None or not stream.startswith("tasks."):
            limit = 0
        while True:  # back-pressure: wait while the task stream is full
            entry_id = await self._writes.run(lua.PUBLISH, (key,), (limit, 0), (frame,))
            if entry_id:
                return _s(entry_id)
            await anyio.sleep(self.redis_settings.backpressure_poll_s)

    # -- consuming -----------------------------------------------------------------------------

    async def consume(self, stream: str, *, group: str, consumer: str) -> AsyncIterator[Delivery]:
        key, dead = self.key(stream), self.dead_key(stream)
        rs, bs = self.redis_settings, self.settings
        lease_ms = max(1, int(bs.lease_s * 1000))
        block_ms = max(1, int(bs.block_s * 1000))
        reclaim_every = min(bs.lease_s / 4, bs.block_s)
        buffered: deque[tuple[float, str, bytes, int]] = deque()
        next_reclaim = 0.0
        # Adaptive prefetch: take one entry per read until the caller shows it drains a batch
        # quickly, then double up to read_count; fall back to one as soon as it is slow. A slow
        # consumer thus never sits on entries other consumers could run.
        count, batch_at = 1, 0.0
        backlog = False  # the last read took as many entries as it asked for
        # A requester's reads of replies wait for its writes in flight (see below); a worker's reads of tasks
        # do not: its commits do not bring its next task, and waiting for their answer made it late for the
        # next task of a caller that sends one at a time.
        settle_s = rs.results_read_after_writes_s if stream.startswith("results.") else 0.0
        await self._call("consume", lambda: self._ensure_group(key, group))
        # The blocking XREADGROUP runs on a connection held for the life of this generator (taken at
        # the first read, given back to the pool when it closes): no pool checkout and no reply
        # callbacks per read. A failed read disconnects it and the retry reconnects it.
        conn: Any = None

        async def xreadgroup() -> Any:
            nonlocal conn
            if conn is None:
                conn = await self._hold_connection()
            [reply] = await _roundtrip(conn, [("XREADGROUP", "GROUP", group, consumer, "COUNT", count,
                                              "BLOCK", block_ms, "STREAMS", key, ">")], self._deadlines)
            if isinstance(reply, ResponseError):
                raise reply
            return reply

        async def read(fn: Callable[[], Awaitable[Any]]) -> Any:
            try:
                return await self._call("consume", fn)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                # Redis lost the stream or the group (restart without persistence, flush): recreate.
                await self._call("consume", lambda: self._ensure_group(key, group, force=True))
                return None

        try:
            while True:
                if buffered:
                    read_at, entry_id, frame, n = buffered[0]
                    if time.monotonic() - read_at >= bs.lease_s / 2:
                        # Held past half a lease: too little left to work on. Hand the whole buffer
                        # back at once so any consumer (this one included) can reclaim it now.
                        stale, count = [(e[1], e[3]) for e in buffered], 1
                        buffered.clear()
                        await self._hand_back(key, group, consumer, stale)
                        continue
                    buffered.popleft()
                    delivery = await self._decode(stream, key, dead, group, consumer, entry_id, frame, n)
                    if delivery is not None:
                        yield delivery
                    continue
                now = time.monotonic()
                if batch_at:
                    count = min(rs.read_count, count * 2) if now - batch_at < bs.lease_s / 8 else 1
                    batch_at = 0.0
                if now >= next_reclaim:
                    next_reclaim = now + reclaim_every
                    claimed = await read(functools.partial(
                        self._eval, lua.RECLAIM, [key, dead],
                        [group, consumer, lease_ms, min(count, rs.reclaim_count), bs.max_deliveries,
                         rs.dead_letter_maxlen]))
                    if claimed:
                        batch_at = time.monotonic()
                        buffered.extend((batch_at, _s(i), bytes(f), int(n)) for i, f, n in claimed)
                        continue
                # Before a read that may block, let the work handed out so far run: its writes (a worker's
                # commits, a manager's acks) then go out before the read and together, not one per read.
                await anyio.lowlevel.checkpoint()
                if settle_s and self._writes.busy and not backlog:
                    # ... and, with no backlog to read, wait (briefly) until none is in flight: the replies
                    # that arrive meanwhile are then taken in one read, where a read already waiting would
                    # take them one at a time, each costing this process and Redis a wake-up and a round trip.
                    with anyio.move_on_after(settle_s):
                        await self._writes.settled()
                reply = await read(xreadgroup)
                if not reply:
                    next_reclaim = 0.0  # idle: look for expired leases on every poll
                    backlog = False
                    continue
                batch_at = time.monotonic()
                # RESP2: [[key, entries]]; RESP3: {key: entries}. An entry is [id, [field, value, ...]].
                for entries in reply.values() if isinstance(reply, dict) else (r[1] for r in reply):
                    for entry_id, fields in entries:
                        buffered.append((batch_at, _s(entry_id), _frame(fields), 1))
                backlog = len(buffered) >= count  # a full read: more may be waiting already
        finally:
            try:
                # Closed (or cancelled) with entries read ahead but never yielded: hand them back now,
                # or they would sit pending for this consumer until the lease ran out. Not for longer
                # than that lease, though: with Redis away the hand-back would wait for it.
                if buffered:
                    stale = [(e[1], e[3]) for e in buffered]
                    buffered.clear()
                    give_up_s = min(rs.socket_timeout_s, bs.lease_s)
                    with anyio.CancelScope(shield=True, deadline=anyio.current_time() + give_up_s):
                        try:
                            await self._hand_back(key, group, consumer, stale)
                        except Exception as exc:  # the lease expires anyway
                            log.warning("prefetched_entries_not_handed_back", key=key, error=str(exc))
            finally:
                if conn is not None:  # a read cut short disconnected it: the pool reconnects it when lent
                    with anyio.CancelScope(shield=True):
                        await self._return_connection(conn)

    async def _hand_back(self, key: str, group: str, consumer: str, entries: list[tuple[str, int]]) -> None:
        async def one(entry_id: str, deliveries: int) -> None:
            await self._writes.run(lua.RELEASE, (key,), (group, _RELEASE_IDLE_MS), (consumer, entry_id, deliveries))

        async with anyio.create_task_group() as tg:  # concurrent, so they share one batch
            for entry_id, deliveries in entries:
                tg.start_soon(one, entry_id, deliveries)
        log.info("prefetched_entries_handed_back", key=key, consumer=consumer, count=len(entries))

    async def _decode(self, stream: str, key: str, dead: str, group: str, consumer: str, entry_id: str,
                      frame: bytes, deliveries: int) -> Delivery | None:
        try:
            envelope = self.settings.codec.decode(frame, stream=stream)
        except ProtocolError as exc:
            reason = f"undecodable frame: {exc}"
        else:
            return Delivery(stream, group, consumer, entry_id, envelope, deliveries, frame)
        await self._writes.run(lua.BURY, (key, dead), (group, self.redis_settings.dead_letter_maxlen),
                               (entry_id, reason, frame, deliveries))
        log.warning("frame_dead_lettered", stream=stream, entry_id=entry_id, reason=reason)
        return None

    # -- settling ------------------------------------------------------------------------------

    async def _fenced(self, script: lua.Script, delivery: Delivery, keys: tuple[str, ...],
                      fixed: tuple[Any, ...], *extra: Any) -> bytes:
        item = (delivery.consumer, delivery.entry_id, delivery.deliveries, *extra)
        reply: bytes = await self._writes.run(script, keys, (delivery.group, *fixed), item)
        if reply.startswith(b"LEASELOST"):
            why = reply.removeprefix(b"LEASELOST").strip().decode(errors="replace")
            raise LeaseLost(f"{delivery.consumer!r} no longer owns entry {delivery.entry_id} of "
                            f"{delivery.stream!r}: {why}")
        return reply

    async def ack(self, delivery: Delivery) -> None:
        await self._writes.run(lua.ACK, (self.key(delivery.stream),), (delivery.group,), (delivery.entry_id,))

    async def ack_many(self, deliveries: Sequence[Delivery]) -> None:
        if deliveries:
            await self._writes.run_many([(lua.ACK, (self.key(d.stream),), (d.group,), (d.entry_id,))
                                         for d in deliveries])

    async def bury(self, delivery: Delivery, reason: str) -> None:
        key = self.key(delivery.stream)
        await self._writes.run(lua.BURY, (key, self.dead_key(delivery.stream)),
                               (delivery.group, self.redis_settings.dead_letter_maxlen),
                               (delivery.entry_id, reason, delivery.frame, delivery.deliveries))
        log.warning("entry_dead_lettered", stream=delivery.stream, entry_id=delivery.entry_id, reason=reason)

    async def commit(self, delivery: Delivery, stream: str, envelope: Envelope) -> str:
        frame = self.settings.codec.encode(envelope, signer=signer_for(stream))
        return _s(await self._fenced(lua.COMMIT, delivery, (self.key(delivery.stream), self.key(stream)), (), frame))

    async def renew(self, delivery: Delivery) -> None:
        await self._fenced(lua.RENEW, delivery, (self.key(delivery.stream),), ())

    async def release(self, delivery: Delivery) -> None:
        await self._fenced(lua.RELEASE, delivery, (self.key(delivery.stream),), (_RELEASE_IDLE_MS,))

    # -- inspection ----------------------------------------------------------------------------

    async def dead_letters(self, stream: str, *, last: int | None = None) -> list[DeadLetter]:
        key = self.dead_key(stream)
        if last is None:
            entries: Any = await self._call("dead_letters", lambda: self._redis.xrange(key))
        elif last <= 0:
            return []
        else:
            newest: Any = await self._call("dead_letters", lambda: self._redis.xrevrange(key, count=last))
            entries = list(reversed(newest or []))
        out: list[DeadLetter] = []
        for _, fields in entries:
            out.append(DeadLetter(stream=stream, entry_id=_s(fields[b"id"]), reason=_s(fields[b"reason"]),
                                  frame=bytes(fields[b"f"]), deliveries=int(fields[b"n"]),
                                  time=float(fields[b"t"])))
        return out

    async def dead_letter_count(self, stream: str) -> int:
        count: Any = await self._call("dead_letter_count", lambda: self._redis.xlen(self.dead_key(stream)))
        return int(count)

    async def depth(self, stream: str, group: str) -> int:
        key = self.key(stream)

        async def count() -> int:
            try:
                groups = await self._redis.xinfo_groups(key)
            except ResponseError as exc:
                if "no such key" in str(exc).lower():
                    return 0
                raise
            info = next((g for g in groups if _s(g["name"]) == group), None)
            if info is None:
                return int(await self._redis.xlen(key))
            pending = int(info["pending"])
            if info.get("lag") is not None:
                return pending + int(info["lag"])
            # lag is unknown (after a restart, or deletions past last-delivered-id): count the tail.
            waiting, start = 0, "(" + _s(info["last-delivered-id"])
            while True:
                batch: Any = await self._redis.xrange(key, min=start, count=1000)
                waiting += len(batch)
                if len(batch) < 1000:
                    return pending + waiting
                start = "(" + _s(batch[-1][0])

        return await self._call("depth", count)

    # -- control messages ----------------------------------------------------------------------

    async def read(self, stream: str, *, after: str = "0", count: int = 1000,
                   block_s: float = 0.0) -> list[tuple[str, Envelope]]:
        key = self.key(stream)
        block = int(block_s * 1000) if block_s > 0 else None
        reply: Any = await self._call("read", lambda: self._redis.xread({key: after}, count=count, block=block))
        out: list[tuple[str, Envelope]] = []
        for _, entries in reply or ():
            for entry_id, fields in entries:
                try:
                    out.append((_s(entry_id), self.settings.codec.decode(bytes(fields[b"f"]), stream=stream)))
                except (ProtocolError, KeyError):
                    continue  # a log reader skips what it cannot read; the log's writer owns it
        return out

    async def expire(self, stream: str, ttl_s: float) -> None:
        await self.expire_each((stream,), ttl_s)

    async def expire_each(self, streams: Iterable[str], ttl_s: float) -> None:
        seconds = _seconds(ttl_s)
        if writes := [(lua.EXPIRE, (self.key(stream),), (), (seconds,)) for stream in streams]:
            await self._writes.run_many(writes)

    async def incarnation(self) -> str:
        # The first caller after Redis lost its data writes a new id; everyone then reads the same one.
        key = f"{self.redis_settings.namespace}:incarnation"
        fresh = uuid.uuid4().hex

        async def read() -> str:
            await self._redis.set(key, fresh, nx=True)
            return _s(await self._redis.get(key) or fresh)

        return await self._call("incarnation", read)

    async def put_value(self, key: str, value: bytes, *, ttl_s: float | None = None) -> None:
        await self.put_values({key: value}, ttl_s=ttl_s)

    async def put_values(self, values: Mapping[str, bytes], *, ttl_s: float | None = None) -> None:
        # Through the write batcher: one write for all of them, shared with whatever else is queued.
        px = 0 if ttl_s is None else max(1, int(ttl_s * 1000))
        if values:
            await self._writes.run_many([(lua.SET_VALUE, (self.value_key(key),), (px,), (value,))
                                         for key, value in values.items()])

    async def put_values_in_parts(self, values: Mapping[str, Sequence[bytes]], *, ttl_s: float | None = None) -> None:
        # Small values in one round trip for all of them (unless a big write of the same key is under way);
        # big ones a piece at a time, each on its own.
        limit = self.redis_settings.value_piece_bytes
        small = {key: b"".join(parts) for key, parts in values.items()
                 if key not in self._value_locks and _at_most(parts, limit)}
        await self.put_values(small, ttl_s=ttl_s)
        for key, parts in values.items():
            if key not in small:
                await self._put_in_pieces(key, parts, ttl_s)

    async def _put_in_pieces(self, key: str, parts: Sequence[bytes], ttl_s: float | None) -> None:
        # Up a piece at a time under a staging key, then into place at once. Writes of one key wait for each
        # other, so a value written earlier never lands after a later one.
        lock = self._value_locks.setdefault(key, anyio.Lock())
        try:
            async with lock:
                for attempt in range(3):
                    try:
                        await self._put_staged(key, parts, ttl_s)
                        return
                    except ResponseError as exc:
                        if not str(exc).startswith("STAGING") or attempt == 2:
                            raise
                        log.warning("staged_value_lost", key=key, error=str(exc))  # expired during an outage
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting and self._value_locks.get(key) is lock:
                del self._value_locks[key]

    async def _put_staged(self, key: str, parts: Sequence[bytes], ttl_s: float | None) -> None:
        value_key = self.value_key(key)
        # In the value key's hash slot (its own tag, or its whole name as the tag), under the namespace.
        write = uuid.uuid4().hex
        staging = (f"{value_key}:staging:{write}" if "{" in value_key
                   else f"{self.redis_settings.namespace}:staging:{{{value_key}}}:{write}")
        offset = 0
        for piece in _pieces(parts, self.redis_settings.value_piece_bytes):
            await self._call("put_values_in_parts", functools.partial(
                self._eval, lua.STAGE_PIECE, [staging], [_STAGING_TTL_MS, offset, piece]))
            offset += len(piece)
        px = 0 if ttl_s is None else max(1, int(ttl_s * 1000))
        await self._call("put_values_in_parts", functools.partial(self._eval, lua.PUT_STAGED, [staging, value_key], [px]))

    async def get_value(self, key: str, *, max_bytes: int | None = None) -> bytes | None:
        if max_bytes is None:
            value: Any = await self._call("get_value", lambda: self._redis.get(self.value_key(key)))
            return None if value is None else bytes(value)
        reply: Any = await self._call("get_value", functools.partial(
            self._eval, lua.GET_CAPPED, [self.value_key(key)], [max_bytes]))
        if not reply:
            return None
        if reply[0] == b"TOOLARGE":
            raise ValueTooLarge(f"value {key!r} is {int(reply[1])} bytes, over the {max_bytes} its reader takes")
        return bytes(reply[1])

    async def get_value_prefix(self, key: str, size: int) -> bytes | None:
        reply: Any = await self._call("get_value_prefix", functools.partial(
            self._eval, lua.GET_PREFIX, [self.value_key(key)], [max(1, size)]))
        return bytes(reply[0]) if reply else None

    async def delete_value(self, key: str) -> None:
        # UNLINK: a big value (a staged job) is freed off Redis's main thread.
        await self._call("delete_value", lambda: self._redis.unlink(self.value_key(key)))

    def value_key(self, key: str) -> str:
        """The Redis key of a stored value (run snapshots)."""
        return f"{self.redis_settings.namespace}:value:{key}"

    def presence_key(self, capability: str) -> str:
        """Where a capability's live workers are announced (in the capability's hash slot)."""
        return f"{self.redis_settings.namespace}:{{cap.{capability}}}:presence"

    async def announce(self, worker: str, capabilities: Iterable[str], *, ttl_s: float) -> None:
        ttl_ms = max(1, int(ttl_s * 1000))
        for capability in capabilities:
            key = self.presence_key(capability)
            await self._call("announce", lambda key=key: self._eval(lua.ANNOUNCE, [key], [worker, ttl_ms]))  # type: ignore[misc]

    async def served(self, capabilities: Iterable[str]) -> dict[str, int]:
        counts: dict[str, int] = {}
        for capability in capabilities:
            key = self.presence_key(capability)
            counts[capability] = int(await self._call("served", lambda key=key: self._eval(lua.LIVE, [key], [])))  # type: ignore[misc]
        return counts

    def follows_key(self) -> str:
        """Where readers say which runs' histories they follow (a sorted set: ``seq:run id`` by expiry)."""
        return f"{self.redis_settings.namespace}:follows"

    async def follow(self, run_id: str, *, after_seq: int, ttl_s: float) -> None:
        ttl_ms = max(1, int(min(ttl_s, MAX_FOLLOW_TTL_S) * 1000))
        member = f"{after_seq}:{run_id}"
        keep_ms = int(MAX_FOLLOW_TTL_S * 1000)
        await self._call("follow", lambda: self._eval(lua.FOLLOW, [self.follows_key()], [member, ttl_ms, keep_ms]))

    async def followers(self, *, limit: int) -> list[tuple[str, int]]:
        members: Any = await self._call("followers", lambda: self._eval(
            lua.FOLLOWERS, [self.follows_key()], [limit, int(MAX_FOLLOW_TTL_S * 1000)]))
        return [follow for member in members if (follow := _follow_of(member)) is not None]

    async def broadcast(self, topic: str, envelope: Envelope) -> None:
        frame = self.settings.codec.encode(envelope, signer=signer_for(topic))
        await self._call("broadcast", lambda: self._redis.publish(self.channel(topic), frame))

    @contextlib.asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[AsyncIterator[Envelope]]:
        channel = self.channel(topic)
        pubsub = self._redis.pubsub()
        try:
            await self._call("subscribe", lambda: self._subscribed(pubsub, channel))
            yield self._messages(pubsub, topic)
        finally:
            with anyio.CancelScope(shield=True):
                await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # annotated only in newer redis-py

    async def _subscribed(self, pubsub: Any, channel: str) -> None:
        """Subscribe and wait for the server's confirmation, so nothing published after is missed."""
        await pubsub.subscribe(channel)
        with anyio.fail_after(self.redis_settings.socket_timeout_s):
            while True:
                message = await pubsub.get_message(timeout=1.0)
                if message is not None and message["type"] == "subscribe":
                    return

    async def _messages(self, pubsub: Any, topic: str) -> AsyncIterator[Envelope]:
        timeout = max(self.settings.block_s, 0.01)
        while True:
            message = await self._call(
                "subscribe", lambda: cast(Awaitable[Any], pubsub.get_message(ignore_subscribe_messages=True,
                                                                              timeout=timeout)))
            if message is None or message["type"] != "message":
                continue
            try:
                yield self.settings.codec.decode(message["data"], stream=topic)
            except ProtocolError as exc:
                log.warning("control_message_dropped", topic=topic, error=str(exc))


_MAX_FOLLOW_MEMBER = 256  # ``seq:run id``; anyone who can write to Redis writes these


def _follow_of(member: Any) -> tuple[str, int] | None:
    """(run id, seq) from a follows entry, or None for one that is not of that form."""
    if not isinstance(member, bytes) or len(member) > _MAX_FOLLOW_MEMBER:
        return None
    seq, sep, run_id = member.partition(b":")
    if not sep or not run_id or not seq.isdigit() or len(seq) > 18:
        return None
    try:
        return run_id.decode("ascii"), int(seq)
    except UnicodeDecodeError:
        return None
