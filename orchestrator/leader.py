"""One active manager at a time: a lease in Redis with a fencing epoch.

A manager takes the lease (``SET NX PX``) and, in the same script, increments the epoch, so
every leadership has a number no earlier one had. It renews the lease a few times per lease
period with a check-and-extend script; when a renewal finds the lease gone or held by
someone else, the manager has lost leadership and must stop at once (``LeadershipLost``).
A standby polls until the lease is free: after a crash that is one lease period.

Redis being unreachable is waited out, never a reason to exit (unless ``exit_after_s`` is
given): ``acquire`` retries through connection errors with backoff, and a leader that cannot
renew counts its lease down on the monotonic clock from the moment it sent its last successful
renewal. When that time is up the lease may have expired in Redis and another manager may
hold it, so it steps down (``LeadershipLost``) before that could happen, and stands by again.
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import anyio
import redis.asyncio as aioredis
import structlog
from anyio.abc import TaskStatus
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ReadOnlyError

from protocol.errors import OrchestratorError
from protocol.outage import Backoff, Outage
from protocol.settings import redact_url

__all__ = ("LeaderLease", "LeadershipLost")

log = structlog.get_logger("orchestrator.leader")

T = TypeVar("T")

# Redis down, restarting (LOADING is a ConnectionError), or a demoted primary after a failover: wait.
_UNREACHABLE = (aioredis.ConnectionError, aioredis.TimeoutError, OSError, ReadOnlyError)

_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  local epoch = redis.call('INCR', KEYS[2])
  redis.call('SET', KEYS[1], ARGV[1] .. '@' .. epoch, 'PX', ARGV[2])
  return epoch
end
return false
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class LeadershipLost(OrchestratorError):
    """Another manager holds the lease now; this one must stop."""


class LeaderLease:
    """``epoch = await lease.acquire()``, then ``tg.start(lease.hold)`` for as long as this manager runs.

    ``exit_after_s``: raise ``BusUnavailable`` once Redis has been unreachable that long (None: never).
    Close with :meth:`aclose` when the process is done with it.
    """

    def __init__(self, url: str, *, name: str, namespace: str = "orch", lease_s: float = 5.0,
                 exit_after_s: float | None = None, backoff_base_s: float = 0.05, backoff_cap_s: float = 2.0) -> None:
        self.url = url
        self.name = name
        self.lease_s = lease_s
        self.epoch = 0
        self._key = f"{namespace}:{{mgr}}:lease"
        self._epoch_key = f"{namespace}:{{mgr}}:epoch"
        self._backoff = (backoff_base_s, backoff_cap_s)
        self.outage = Outage(redact_url(url), limit_s=exit_after_s)
        self._valid_until = 0.0  # monotonic time by which the lease may have expired in Redis
        self._redis = aioredis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=max(2.0, lease_s),
                                              retry=Retry(NoBackoff(), 0))  # one retry policy, ours

    @property
    def token(self) -> str:
        """What the lease key holds while this manager leads."""
        return f"{self.name}@{self.epoch}"

    async def _call(self, op: str, fn: Callable[[], Awaitable[T]]) -> tuple[T, float]:
        """Run ``fn``, waiting out an outage with backoff (``BusUnavailable`` only past ``exit_after_s``).

        Returns its result and the monotonic time the successful attempt was sent.
        """
        backoff = Backoff(*self._backoff)
        while True:
            started = time.monotonic()
            try:
                result = await fn()
            except _UNREACHABLE as exc:
                await anyio.sleep(self.outage.failed(op, exc, started=started, backoff=backoff))
            else:
                self.outage.recovered()
                return result, started

    async def acquire(self, *, poll_s: float | None = None) -> int:
        """Wait until this manager holds the lease, however long Redis is away; returns its fencing epoch."""
        poll = poll_s or self.lease_s / 3
        waiting_logged = False
        while True:
            epoch, sent = await self._call("the manager lease", functools.partial(
                self._redis.eval, _ACQUIRE, 2, self._key, self._epoch_key, self.name, int(self.lease_s * 1000)))
            if epoch:
                self.epoch = int(epoch)
                self._valid_until = sent + self.lease_s
                log.info("leadership_acquired", manager=self.name, epoch=self.epoch)
                return self.epoch
            holder = _text((await self._call("the manager lease", functools.partial(self._redis.get, self._key)))[0])
            if self.epoch and holder == self.token:
                # Our own lease from before we stepped down (Redis came back before it expired): drop it.
                await self._call("the manager lease", functools.partial(self._redis.eval, _RELEASE, 1, self._key,
                                                                         self.token))
                continue
            if not waiting_logged:
                log.info("standing_by", manager=self.name, holder=holder)
                waiting_logged = True
            await anyio.sleep(poll)

    async def hold(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Renew the lease until cancelled; raises LeadershipLost when it was taken, or may have expired."""
        task_status.started()
        delay, backoff = self.lease_s / 3, Backoff(*self._backoff)
        while True:
            await anyio.sleep(min(delay, max(0.0, self._valid_until - time.monotonic())))
            sent = time.monotonic()
            left = self._valid_until - sent
            if left <= 0:
                raise LeadershipLost(f"manager {self.name!r} could not renew its lease (epoch {self.epoch}) within "
                                     f"{self.lease_s:g}s, so another manager may hold it now; stepping down")
            with anyio.move_on_after(left):  # no answer before the lease runs out: the check above steps down
                try:
                    renewed = await self._redis.eval(_RENEW, 1, self._key, self.token, int(self.lease_s * 1000))
                except _UNREACHABLE as exc:
                    delay = self.outage.failed("the manager lease", exc, started=sent, backoff=backoff)
                    continue  # the lease is still ours until _valid_until: try again before then
                self.outage.recovered()
                if not renewed:
                    raise LeadershipLost(f"manager {self.name!r} lost the lease (epoch {self.epoch}); stopping")
                self._valid_until = sent + self.lease_s
                delay, backoff = self.lease_s / 3, Backoff(*self._backoff)

    async def release(self) -> None:
        """Give the lease up at once so a standby takes over without waiting for expiry (one try)."""
        with anyio.CancelScope(shield=True), contextlib.suppress(*_UNREACHABLE):  # it expires anyway
            await self._redis.eval(_RELEASE, 1, self._key, self.token)

    async def aclose(self) -> None:
        """Close the connection to Redis."""
        with anyio.CancelScope(shield=True):
            await self._redis.aclose()


def _text(value: object) -> str | None:
    return value.decode() if isinstance(value, bytes) else None if value is None else str(value)
