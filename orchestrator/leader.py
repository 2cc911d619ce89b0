"""One active manager at a time: a lease in Redis with a fencing epoch.

A manager takes the lease (``SET NX PX``) and, in the same script, increments the epoch, so
every leadership has a number no earlier one had. It renews the lease a few times per lease
period with a check-and-extend script; when a renewal finds the lease gone or held by
someone else, the manager has lost leadership and must stop at once (``LeadershipLost``).
A standby polls until the lease is free: after a crash that is one lease period.
"""

from __future__ import annotations

import contextlib

import anyio
import redis.asyncio as aioredis
import structlog
from anyio.abc import TaskStatus

from protocol.errors import BusUnavailable, OrchestratorError
from protocol.settings import redact_url

__all__ = ("LeaderLease", "LeadershipLost")

log = structlog.get_logger("orchestrator.leader")

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
    """``epoch = await lease.acquire()``, then ``tg.start(lease.hold)`` for as long as this manager runs."""

    def __init__(self, url: str, *, name: str, namespace: str = "orch", lease_s: float = 5.0) -> None:
        self.url = url
        self.name = name
        self.lease_s = lease_s
        self.epoch = 0
        self._key = f"{namespace}:{{mgr}}:lease"
        self._epoch_key = f"{namespace}:{{mgr}}:epoch"
        self._redis = aioredis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=max(2.0, lease_s))

    @property
    def token(self) -> str:
        """What the lease key holds while this manager leads."""
        return f"{self.name}@{self.epoch}"

    async def acquire(self, *, poll_s: float | None = None) -> int:
        """Wait until this manager holds the lease; returns its fencing epoch."""
        poll = poll_s or self.lease_s / 3
        waiting_logged = False
        while True:
            try:
                epoch = await self._redis.eval(_ACQUIRE, 2, self._key, self._epoch_key, self.name,
                                               int(self.lease_s * 1000))
            except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
                raise BusUnavailable(f"cannot reach Redis at {redact_url(self.url)} for the manager lease: "
                                     f"{exc}") from exc
            if epoch:
                self.epoch = int(epoch)
                log.info("leadership_acquired", manager=self.name, epoch=self.epoch)
                return self.epoch
            if not waiting_logged:
                holder = await self._redis.get(self._key)
                log.info("standing_by", manager=self.name, holder=holder.decode() if isinstance(holder, bytes) else holder)
                waiting_logged = True
            await anyio.sleep(poll)

    async def hold(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Renew the lease until cancelled; raises LeadershipLost when it was taken or expired."""
        task_status.started()
        while True:
            await anyio.sleep(self.lease_s / 3)
            try:
                renewed = await self._redis.eval(_RENEW, 1, self._key, self.token, int(self.lease_s * 1000))
            except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
                log.warning("lease_renewal_failed", error=str(exc))
                continue  # the lease may still be ours; the next renewal decides
            if not renewed:
                raise LeadershipLost(f"manager {self.name!r} lost the lease (epoch {self.epoch}); stopping")

    async def release(self) -> None:
        """Give the lease up at once so a standby takes over without waiting for expiry."""
        with anyio.CancelScope(shield=True):
            with contextlib.suppress(aioredis.ConnectionError, aioredis.TimeoutError, OSError):  # it expires anyway
                await self._redis.eval(_RELEASE, 1, self._key, self.token)
            await self._redis.aclose()
