"""The manager's timers: time, worker presence, dead letters and a bus that lost its data.

Each watchdog turns something the world did into an engine input (``Tick``, ``Presence``,
``DeadLettered``, ``Redrive``) and hands it to the manager, which applies it like any other.
None of them decides anything: the rules live in the engine.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterable

import anyio
import structlog

from orchestrator.engine import DeadLettered, Input, Instant, Presence, Redrive, Tick
from protocol.bus import Bus
from protocol.errors import OrchestratorError
from protocol.keys import tasks_stream

__all__ = ("Watchdogs", "now")

log = structlog.get_logger("orchestrator.manager")


def now() -> Instant:
    """The current time as the engine takes it."""
    return Instant(time.time(), time.monotonic())


# Applies one input to one run (None: to every run this manager holds); unknown runs ignore it.
Feed = Callable[[str | None, Input], Awaitable[None]]


class Watchdogs:
    """``tick`` and ``watch_bus`` run for the manager's lifetime."""

    def __init__(self, bus: Bus, feed: Feed, *, capabilities: Callable[[], Iterable[str]], incarnation: str) -> None:
        self.bus = bus
        self.feed = feed
        self.capabilities = capabilities  # the capabilities the manager's runs use
        self.incarnation = incarnation
        self.served: frozenset[str] | None = None  # the latest presence seen
        self._dead_seen: dict[str, int] = {}

    async def tick(self, interval_s: float) -> None:
        """Time passes: deadlines and retry delays."""
        while True:
            await anyio.sleep(interval_s)
            await self.feed(None, Tick(now()))

    async def watch_bus(self, interval_s: float) -> None:
        """Presence, dead letters and bus data loss, once per ``interval_s``."""
        while True:
            await anyio.sleep(interval_s)
            try:
                await self.check_presence()
                await self._check_dead_letters()
                current = await self.bus.incarnation()
            except OrchestratorError as exc:
                # Presence is not fed while the bus is away, so nobody is failed for a missing worker then.
                log.warning("bus_unreachable", error=str(exc))
                continue
            if current != self.incarnation:
                log.warning("bus_data_lost", previous=self.incarnation, current=current)
                self.incarnation = current
                await self.feed(None, Redrive(now()))

    async def check_presence(self, also: Iterable[str] = ()) -> None:
        """Read which capabilities live workers serve (the runs' and ``also``) and tell every run."""
        counts = await self.bus.served(sorted({*self.capabilities(), *also}))
        self.served = frozenset(c for c, n in counts.items() if n > 0)
        await self.feed(None, Presence(self.served, now()))

    async def worker_seen(self, capability: str) -> None:
        """A worker of ``capability`` just answered, so the capability is served, whatever the last check said.

        A check made while the fleet was starting, before its workers announced themselves, found nobody: every
        run started until the next check recorded its tasks as waiting for a worker, with one at work (and had
        them told they no longer wait, after it). The next check still has the last word: a worker that answered
        and then died, or a reply redelivered from long ago, counts as presence for one interval at most.
        """
        if self.served is None or capability in self.served:
            return
        self.served = self.served | {capability}
        await self.feed(None, Presence(self.served, now()))

    async def _check_dead_letters(self) -> None:
        """Fail the tasks whose messages the bus gave up on (poison), instead of letting their runs hang."""
        for capability in sorted(set(self.capabilities())):
            stream = tasks_stream(capability)
            count = await self.bus.dead_letter_count(stream)  # cheap: most of the time nothing is new
            seen = min(self._dead_seen.get(stream, 0), count)  # fewer than seen: trimmed, or the bus lost its data
            self._dead_seen[stream] = count
            for letter in await self.bus.dead_letters(stream, last=count - seen):
                try:
                    env = self.bus.settings.codec.decode(letter.frame)
                except OrchestratorError:
                    continue  # garbage that never was a task of ours
                if env.run_id:  # runs this manager does not hold ignore it
                    await self.feed(env.run_id, DeadLettered(env.task_id, env.attempt, letter.reason, now()))
