"""Riding out a Redis outage: capped, jittered exponential backoff, a log line a minute, an optional limit.

A process that loses Redis keeps retrying, as arq, Celery and Dramatiq workers wait for their
broker. Each retry loop (one call) has its own :class:`Backoff`. All the calls of one client
share one :class:`Outage`, so the process logs one line when Redis becomes unreachable, one a
minute while it stays so (``for_s`` says how long), and one when it is back, however many
calls are waiting. With ``limit_s`` the calls raise ``BusUnavailable`` once the outage has
lasted that long (``orchestrator manager|worker --exit-after-s``); without it they never give up.

Time is read from ``clock`` (monotonic), and the jitter from ``rng``, so tests drive both.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import structlog

from protocol.errors import BusUnavailable

__all__ = ("Backoff", "Outage")

log = structlog.get_logger("protocol.outage")

LOG_EVERY_S = 60.0


class Backoff:
    """The delays of one retry loop: ``base_s`` doubling up to ``cap_s``, each scaled by U(0.5, 1) (jitter)."""

    def __init__(self, base_s: float, cap_s: float, *, rng: Callable[[], float] = random.random) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self._rng = rng
        self._next = min(base_s, cap_s)

    def next(self) -> float:
        """The delay before the next attempt; never more than ``cap_s``."""
        delay = self._next * (0.5 + 0.5 * self._rng())
        self._next = min(self.cap_s, self._next * 2)
        return delay


class Outage:
    """One client's view of Redis being unreachable, shared by all of its calls.

    A call reports each failed attempt with :meth:`failed`, which logs, raises past the limit,
    and returns how long to wait; a successful call reports :meth:`recovered`.
    """

    def __init__(self, url: str, *, limit_s: float | None = None, log_every_s: float = LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url  # already redacted: it goes into logs and errors
        self.limit_s = limit_s
        self.log_every_s = log_every_s
        self.clock = clock
        self.since: float | None = None  # when the current outage began; None while Redis answers
        self._logged_at = 0.0
        self._ended_at = float("-inf")

    @property
    def down_s(self) -> float:
        """How long the current outage has lasted (0 when there is none)."""
        return 0.0 if self.since is None else self.clock() - self.since

    def failed(self, op: str, exc: BaseException, *, started: float, backoff: Backoff) -> float:
        """Record a failed attempt at ``op`` (begun at ``started``); returns the seconds to wait before the next.

        Raises ``BusUnavailable`` once the outage has lasted ``limit_s``.
        """
        now = self.clock()
        if self.since is None:
            if started < self._ended_at:
                # This attempt began before another call saw Redis answer again: a stale failure, not a new outage.
                return min(backoff.next(), self.limit_s or float("inf"))
            self.since = self._logged_at = now
            log.warning("redis_unreachable", url=self.url, op=op, error=str(exc),
                        limit_s=self.limit_s)
        elif now - self._logged_at >= self.log_every_s:
            self._logged_at = now
            log.warning("redis_still_unreachable", url=self.url, for_s=round(now - self.since, 1), op=op,
                        error=str(exc), limit_s=self.limit_s)
        down = now - self.since
        if self.limit_s is None:
            return backoff.next()
        if down >= self.limit_s:
            log.error("redis_outage_limit_reached", url=self.url, for_s=round(down, 1), limit_s=self.limit_s, op=op)
            raise BusUnavailable(f"cannot reach Redis at {self.url!r} for {op}: unreachable for {down:.1f}s, "
                                 f"past the limit of {self.limit_s:g}s: {exc}") from exc
        return min(backoff.next(), self.limit_s - down)

    def recovered(self) -> None:
        """Record a successful call: ends the outage, if there was one."""
        if self.since is None:
            return
        now = self.clock()
        log.info("redis_reachable_again", url=self.url, outage_s=round(now - self.since, 1))
        self.since, self._ended_at = None, now
