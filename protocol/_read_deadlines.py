"""The socket timeout for replies read on the bus's held connections, with one timer per connection at a time.

redis-py puts a timer around every reply it reads (``asyncio.timeout``: a timer made, pushed on the event
loop's heap and cancelled for each one), about a tenth of a busy client's CPU on the bus's hot path. Here a
read only notes when its wait began. The connection's one timer, when it fires, closes the connection if a
reply has been awaited longer than the timeout (the read then fails and is reported as a timeout, and the
caller's retry reconnects), and otherwise comes back when the wait under way could expire. A connection
reading replies continuously thus sets one timer per timeout period instead of one per reply.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ("ReadDeadlines",)


class ReadDeadlines:
    """Waits for replies on connections, each given up after ``timeout`` seconds (per connection, per wait)."""

    def __init__(self) -> None:
        self._since: dict[Any, tuple[float, float]] = {}  # connection -> (loop time its wait began, timeout)
        self._timers: dict[Any, asyncio.TimerHandle] = {}
        self._expired: set[Any] = set()

    def waiting(self, conn: Any, timeout: float) -> None:
        """A wait for a reply on ``conn`` begins now (also for each further reply of the same read)."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        self._since[conn] = (began, timeout)
        if conn not in self._timers:
            self._timers[conn] = loop.call_at(began + timeout, self._check, conn)

    def done(self, conn: Any) -> bool:
        """The read on ``conn`` is over (answered or failed); True when it failed because it timed out."""
        self._since.pop(conn, None)
        if conn in self._expired:
            self._expired.discard(conn)
            return True
        return False

    def forget(self, conn: Any) -> None:
        """``conn`` is given back or closed: no timer for it is left behind."""
        self._since.pop(conn, None)
        self._expired.discard(conn)
        timer = self._timers.pop(conn, None)
        if timer is not None:
            timer.cancel()

    def _check(self, conn: Any) -> None:
        del self._timers[conn]
        waiting = self._since.get(conn)
        if waiting is None:
            return  # no read under way: the next one sets a timer again
        began, timeout = waiting
        loop = asyncio.get_running_loop()
        if loop.time() - began < timeout:
            self._timers[conn] = loop.call_at(began + timeout, self._check, conn)
            return
        self._expired.add(conn)
        writer = getattr(conn, "_writer", None)
        if writer is not None:
            writer.transport.abort()  # the read waiting on it ends at once, with a connection error
