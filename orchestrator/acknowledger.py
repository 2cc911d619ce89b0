"""Group commit for the manager: make effects durable, then acknowledge and publish them.

A reply is acknowledged on the bus only after the store's next sync covers what it changed, so a
crash between the two redelivers the reply instead of losing it (and the engine's attempt check
makes the second delivery a no-op). Many replies share one sync; followers on other machines see
a run's history only once it is durable.

Only the histories of runs someone follows are mirrored (``mirror="followed"``): encoding and sending
every run's history was a quarter of the manager's time with many short runs, for followers that are
mostly not there. A follower says which run it follows and how much of its history it has
(``Bus.follow``); the run's history from there comes from the store, then each new event as it
happens, until the follow lapses. ``mirror="all"`` mirrors every run, as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal, get_args

import anyio
import structlog

from orchestrator.records import Event, events_envelope
from orchestrator.store import Store
from protocol.bus import Bus, Delivery
from protocol.errors import FrameTooLarge
from protocol.history import RunStarted
from protocol.keys import events_stream

__all__ = ("MIRRORS", "Acknowledger", "Mirror")

Mirror = Literal["followed", "all", "off"]  # whose history goes to the bus: runs someone follows, every run, none
MIRRORS: tuple[Mirror, ...] = get_args(Mirror)

log = structlog.get_logger("orchestrator.acknowledger")

_DRAIN_S = 2.0  # when the manager stops: how long its last commit may take (with Redis away, redelivery covers it)
_EVENTS_PER_MESSAGE = 500  # keeps a batch of history well under the frame size limit
_TASKS_IN_A_SHARED_START = 5_000  # a start naming more tasks goes in a message of its own (~50 bytes a task)
_CATCH_UPS_PER_COMMIT = 100  # newly followed runs whose history so far one commit reads from the store


class Acknowledger:
    """Collects deliveries to acknowledge and events to mirror; ``run`` commits them in batches."""

    def __init__(self, bus: Bus, store: Store, *, sender: str, mirror: Mirror, history_ttl_s: float,
                 on_committed: Callable[[set[str]], None]) -> None:
        self.bus = bus
        self.store = store
        self.sender = sender
        self.mirror_mode = mirror
        # How long a run's mirrored history stays on the bus after its last event (its end, once it ended).
        self.history_ttl_s = history_ttl_s
        self.on_committed = on_committed  # told which runs changed, once their changes are durable
        self._deliveries: list[Delivery] = []
        self._events: list[Event] = []
        self._unsent: list[Event] = []  # committed, not yet mirrored: sent by the next commit, or the one at stop
        self._followed: dict[str, int] = {}  # run id -> the last seq mirrored (or that its followers have)
        self._catch_up: dict[str, int] = {}  # newly followed runs -> the seq their history is to be sent from
        self._touched: set[str] = set()
        self._wake = anyio.Event()
        self._committed = anyio.Event()  # set when a commit ends, then replaced by a new one

    def defer(self, delivery: Delivery) -> None:
        """Acknowledge ``delivery`` after the next sync."""
        # Its receipt, not the delivery: replies wait here by the thousand while a big commit runs, and their
        # decoded messages were the largest part of the manager's peak memory.
        self._deliveries.append(delivery.receipt())
        self._touched.add(delivery.envelope.run_id)
        self._wake.set()

    @property
    def backlog(self) -> int:
        """Replies handled whose changes no commit has covered yet."""
        return len(self._deliveries)

    async def next_commit(self) -> None:
        """Wait until the commit under way, or else the next one, has ended."""
        await self._committed.wait()

    def mirror(self, event: Event) -> None:
        """Publish ``event`` to the run's history stream after the next sync, if that run's history is mirrored."""
        if self.mirror_mode == "all" or (self.mirror_mode == "followed" and event.run_id in self._followed):
            self._events.append(event)
            self._wake.set()

    def set_followers(self, follows: Iterable[tuple[str, int]]) -> None:
        """The live follows (``Bus.followers``): mirror those runs from now on, and stop for the rest.

        A newly followed run's history from the lowest seq its followers have is read from the store by the next
        commit. A run already followed is not read again for a new follower: that one read the stream first.
        """
        if self.mirror_mode != "followed":
            return
        lowest: dict[str, int] = {}
        for run_id, seq in follows:
            lowest[run_id] = min(seq, lowest.get(run_id, seq))
        for run_id in self._followed.keys() - lowest.keys():
            del self._followed[run_id]
            self._catch_up.pop(run_id, None)
        for run_id, seq in lowest.items():
            if run_id not in self._followed:
                self._followed[run_id] = self._catch_up[run_id] = seq
        if self._catch_up:
            self._wake.set()

    async def run(self) -> None:
        """Commit batches until cancelled; then commit what is left, for at most ``_DRAIN_S``.

        A manager stopped just after a run ended has that end in its ledger; without the last commit, followers
        on other machines would never see it on the bus (a ``watch`` would wait for ever).
        """
        try:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                await self._commit()
        finally:
            if self._deliveries or self._events or self._unsent:
                with anyio.CancelScope(shield=True, deadline=anyio.current_time() + _DRAIN_S):
                    try:
                        await self._commit()
                    except Exception as exc:  # the ledger has it all; replies not acknowledged come again
                        log.warning("last_commit_failed", error=str(exc), events=len(self._unsent))

    async def _commit(self) -> None:
        deliveries, self._deliveries = self._deliveries, []
        touched, self._touched = self._touched, set()
        caught_up = await self._history_so_far()
        # After the read: an event recorded while it ran is in the store's answer, in ``_events``, or both.
        self._unsent += self._events if self.mirror_mode == "all" else self._not_yet_sent(caught_up + self._events)
        self._events = []
        await self.store.sync()
        async with anyio.create_task_group() as tg:  # concurrent writes share the bus's round trips
            tg.start_soon(self.bus.ack_many, deliveries)
            if self._unsent:
                tg.start_soon(self._publish_all)
        self.on_committed(touched)
        committed, self._committed = self._committed, anyio.Event()
        committed.set()

    async def _history_so_far(self) -> list[Event]:
        """The history of newly followed runs, after the seq their followers have, from the store."""
        events: list[Event] = []
        for run_id in list(self._catch_up)[:_CATCH_UPS_PER_COMMIT]:
            after = self._catch_up.pop(run_id)
            events += await self.store.events(run_id, after)
        if self._catch_up:
            self._wake.set()
        return events

    def _not_yet_sent(self, events: list[Event]) -> list[Event]:
        """Followed runs' events past what was sent or their followers have, in order, each once.

        A run whose history so far a later commit reads gets these events from that read, after the earlier ones.
        """
        out = []
        followed, waiting = self._followed, self._catch_up
        for event in events:
            last = followed.get(event.run_id)
            if last is not None and event.seq > last and event.run_id not in waiting:
                followed[event.run_id] = event.seq
                out.append(event)
        return out

    async def _publish_all(self) -> None:
        # Every run's history in one call: with many short runs, a call (and a task) per run was a tenth of the
        # manager's time. A call cancelled before it was sent sends nothing, so the events stay unsent for the
        # commit at stop. A chunk too big to send alone stops the lot before anything is sent; then each run's
        # chunks go on their own and the big one is split, and what is not out when the manager stops (the
        # split of a big batch takes a while) stays unsent for the commit at stop.
        runs = _by_run(self._unsent)
        try:
            await self.bus.publish_each([(events_stream(run_id), events_envelope(run_id, chunk, self.sender))
                                         for run_id, chunks in runs.items() for chunk in chunks],
                                        ttl_s=self.history_ttl_s)
            self._unsent = []
            return
        except FrameTooLarge:
            pass  # handled below, outside the except block, so its traceback does not hold the encoded frames
        out: set[int] = set()  # ids of the events sent, or given up on as too large
        try:
            async with anyio.create_task_group() as tg:
                for run_id, chunks in runs.items():
                    tg.start_soon(self._publish, run_id, chunks, out)
        finally:
            self._unsent = [event for event in self._unsent if id(event) not in out]

    async def _publish(self, run_id: str, chunks: list[list[Event]], out: set[int]) -> None:
        for chunk in chunks:  # in order: a follower reads the stream as the run's history
            await self._publish_chunk(run_id, chunk, out)
        await self.bus.expire(events_stream(run_id), self.history_ttl_s)

    async def _publish_chunk(self, run_id: str, chunk: list[Event], out: set[int]) -> None:
        try:
            await self.bus.publish(events_stream(run_id), events_envelope(run_id, chunk, self.sender))
            out.update(map(id, chunk))
            return
        except FrameTooLarge:
            pass  # handled below, not in here: the error's traceback holds the encoded attempt until the block ends
        if len(chunk) > 1:  # big events (outputs, a big run's start): send the halves
            half = len(chunk) // 2
            await self._publish_chunk(run_id, chunk[:half], out)
            await self._publish_chunk(run_id, chunk[half:], out)
            return
        # One event over the frame limit (the start of a run of ~20,000 tasks or more, a huge output):
        # the ledger keeps it, and followers on other machines see a gap in the sequence numbers.
        out.add(id(chunk[0]))
        log.warning("event_too_large_to_mirror", run_id=run_id, seq=chunk[0].seq, type=chunk[0].body.kind)


def _by_run(events: list[Event]) -> dict[str, list[list[Event]]]:
    """Events grouped per run, in order, in chunks that fit a bus message."""
    runs: dict[str, list[list[Event]]] = {}
    for event in events:
        chunks = runs.setdefault(event.run_id, [[]])
        # A run's start names every task, so a big run's may not fit a message: alone, it is found too big
        # at once, instead of after halving its chunk down to it (an encoding of it at every step). Small
        # starts stay with their run's other events: a chunk more is a round trip more in every commit.
        alone = isinstance(event.body, RunStarted) and len(event.body.tasks) > _TASKS_IN_A_SHARED_START
        if len(chunks[-1]) >= _EVENTS_PER_MESSAGE or alone:
            chunks.append([])
        chunks[-1].append(event)
        if alone:
            chunks.append([])
    return {run_id: [chunk for chunk in chunks if chunk] for run_id, chunks in runs.items()}
