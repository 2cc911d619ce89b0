"""Reading a run's history from the bus: say that you follow it, and keep saying so while you read.

The manager mirrors a run's history to the bus only while someone follows it (``Bus.follow``):
a reader reads what the stream has, says how far that goes, and the manager sends the rest from
its ledger, then each new event as it happens. A follow lapses ``FOLLOW_TTL_S`` after its last
renewal, so a reader that went away stops costing the manager anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import anyio

from orchestrator.records import Event, events_of
from protocol.bus import Bus
from protocol.keys import events_stream

__all__ = ("FOLLOW_TTL_S", "HISTORY_WAIT_S", "Follower", "history_length")

FOLLOW_TTL_S = 15.0  # how long a follow lasts unless renewed
_RENEW_S = FOLLOW_TTL_S / 3  # renewed this often, so one slow renewal does not let it lapse
HISTORY_WAIT_S = 10.0  # how long a reader waits for a manager to send a history it asked for
_READ_COUNT = 1000


def history_length(status: Mapping[str, Any] | None) -> int:
    """How many entries a run's history has, by its summary (``last_seq``); 0 when unknown.

    A summary without ``last_seq`` comes from a manager that mirrored every run: the stream is all there is.
    """
    if status is None:
        return 0
    last_seq = status.get("last_seq")
    return last_seq if isinstance(last_seq, int) and last_seq >= 0 else 0


class Follower:
    """One reader of one run's history: what it has read, and its follow on the bus."""

    def __init__(self, bus: Bus, run_id: str) -> None:
        self.bus = bus
        self.run_id = run_id
        self.seen = 0  # the last seq read; the manager may send an event twice, readers skip what they saw
        self.after = "0"  # the last stream entry read
        self._renew_at = -math.inf

    async def ask(self) -> None:
        """Say that this reader follows the run and has its history up to ``seen`` (at most every few seconds)."""
        if anyio.current_time() >= self._renew_at:
            await self.bus.follow(self.run_id, after_seq=self.seen, ttl_s=FOLLOW_TTL_S)
            self._renew_at = anyio.current_time() + _RENEW_S

    async def read(self, *, block_s: float = 0.0) -> list[Event]:
        """The events after those read so far; with ``block_s``, waits that long for the first new entry."""
        events: list[Event] = []
        entries = await self.bus.read(events_stream(self.run_id), after=self.after, count=_READ_COUNT,
                                      block_s=block_s)
        while entries:
            for entry_id, env in entries:
                self.after = entry_id
                fresh = events_of(env, self.seen)
                if fresh:
                    self.seen = fresh[-1].seq
                    events += fresh
            if len(entries) < _READ_COUNT:
                break
            entries = await self.bus.read(events_stream(self.run_id), after=self.after, count=_READ_COUNT)
        return events

    async def read_until(self, last_seq: int, *, wait_s: float = HISTORY_WAIT_S) -> list[Event]:
        """What the stream has, then what the manager sends, until ``last_seq`` or for at most ``wait_s``.

        Short of ``last_seq`` (``seen`` says how far it got) when no manager sent the rest in time.
        """
        events = await self.read()
        deadline = anyio.current_time() + wait_s
        while self.seen < last_seq and (left := deadline - anyio.current_time()) > 0:
            await self.ask()
            events += await self.read(block_s=min(left, 1.0))
        return events
