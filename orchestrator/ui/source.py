"""Where the console reads runs and sends a person's decisions: a bus, and a way to list its runs.

Both the Redis fleet and an in-process run publish the same things on their bus: each run's
summary (``status``), its history stream (``events``) and an overrides stream the manager
consumes. So one source serves both; only listing runs differs (Redis is scanned for summaries,
an in-process run asks its store).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import redis.asyncio as aioredis

from orchestrator import processes
from orchestrator.following import Follower, history_length
from orchestrator.records import events_of
from orchestrator.ui.view import RunPage
from protocol.bus import Bus
from protocol.errors import BusUnavailable, ConfigError
from protocol.history import HistoryEvent, RunStarted
from protocol.keys import JOBS_STREAM, events_stream, run_snapshot_key
from protocol.messages import OverrideAction, Submit
from protocol.redis_bus import RedisBus
from protocol.settings import redact_url

__all__ = ("MAX_RUNS", "RunSource", "redis_run_ids")

MAX_RUNS = 500  # the run list shows the newest this many; ``status RUN`` still finds older ones

PAGE_WAIT_S = 3.0  # how long a page waits for the manager to send a history the bus lacks
SUMMARY_LAG_S = 2.0  # the manager refreshes a running run's summary every 0.5 s

RunIds = Callable[[], Awaitable[list[str]]]
WhyStill = Callable[[], Awaitable[str]]


@dataclass(frozen=True, slots=True)
class HistoryBatch:
    """New entries of a run's history, and where to read on from."""

    events: list[HistoryEvent]
    after: str


class RunSource:
    """Reads runs from ``bus``; ``run_ids`` lists the runs there are (newest or not, any order).

    ``why_still`` says why nothing moves the runs (no manager leads), or '' while something does; a
    source without one (an in-process run, whose manager is the console's own process) never says.
    """

    def __init__(self, bus: Bus, run_ids: RunIds, *, why_still: WhyStill | None = None) -> None:
        self.bus = bus
        self._run_ids = run_ids
        self._why_still = why_still

    async def why_still(self) -> str:
        """Why the runs are not moving, naming what they wait for, or '' (they are, or this source cannot tell)."""
        return "" if self._why_still is None else await self._why_still()

    async def runs(self) -> list[dict[str, Any]]:
        """Every run's head (id, goal, state, reason, tokens, started, task counts), newest first."""
        rows: list[dict[str, Any]] = []
        for run_id in (await self._run_ids())[:MAX_RUNS * 2]:
            head = await processes.fetch_head(self.bus, run_id)  # not a big run's 25 MB of tasks, every 5 s
            if head is None:
                continue
            rows.append(_row(head, await self._started(run_id, head)))
        rows.extend(await self._queued({r["run_id"] for r in rows}))
        rows.sort(key=lambda r: -(r["started"] or 0.0))
        return rows[:MAX_RUNS]

    async def _started(self, run_id: str, status: dict[str, Any]) -> float | None:
        """When the run started: its summary says (or, from managers before it did, its first history entry)."""
        if isinstance(created := status.get("created"), int | float):
            return float(created)
        for _, env in await self.bus.read(events_stream(run_id), count=1):
            for event in events_of(env):
                if isinstance(event.body, RunStarted):
                    return event.time
        return None

    async def _queued(self, known: set[str]) -> list[dict[str, Any]]:
        """Submissions no manager has taken yet."""
        rows = []
        after = "0"
        while batch := await self.bus.read(JOBS_STREAM, after=after):
            after = batch[-1][0]
            for _, env in batch:
                if isinstance(env.body, Submit) and env.run_id not in known:
                    tasks = env.body.job.get("tasks")
                    count = len(tasks) if isinstance(tasks, list) else 0
                    if env.body.staged is not None:  # its tasks are staged; the submission counts them
                        count = env.body.staged.tasks
                    rows.append({"run_id": env.run_id, "goal": str(env.body.job.get("goal", "")), "state": "queued",
                                 "reason": "waiting for a manager to take the submission", "tokens": 0,
                                 "started": env.time, "tasks": count,
                                 "by_state": {}})
        return rows

    async def status(self, run_id: str) -> dict[str, Any] | None:
        """The manager's latest summary of the run (or a queued submission's), or None."""
        return await processes.find_run(self.bus, run_id)

    async def history_so_far(self, run_id: str, *, wait_s: float = PAGE_WAIT_S
                             ) -> tuple[list[HistoryEvent], dict[str, Any] | None]:
        """The run's whole history so far and its summary; what the bus lacks, the manager is asked for.

        The history is complete when its last ``seq`` is the summary's ``last_seq``; short of it when no
        manager sent the rest within ``wait_s``.
        """
        status = await self.status(run_id)
        return await Follower(self.bus, run_id).read_until(history_length(status), wait_s=wait_s), status

    async def follow(self, run_id: str, *, block_s: float) -> AsyncGenerator[HistoryBatch]:
        """The whole history, then each new batch as the manager records it (empty batches every ``block_s``).

        Following asks the manager to send the run's history (``Follower``): what the stream lacks of it
        arrives in the batches after the first.
        """
        follower = Follower(self.bus, run_id)
        events = await follower.read()
        yield HistoryBatch(events, follower.after)
        while True:
            await follower.ask()
            events = await follower.read(block_s=block_s)
            yield HistoryBatch(events, follower.after)

    async def act(self, run_id: str, task_id: str, action: OverrideAction, *, feedback: str, by: str,
                  bus: Bus | None = None) -> None:
        """Send a person's decision, checked like the CLI's (``processes.send_override``), on ``bus`` or ours.

        That check reads the run's summary, which the manager refreshes twice a second, while the page
        follows the history as it is written: a decision the history already allows is checked again
        for up to ``SUMMARY_LAG_S`` before its refusal stands.
        """
        deadline = anyio.current_time() + SUMMARY_LAG_S
        while True:
            try:
                await processes.send_override(bus or self.bus, run_id, task_id, action, feedback=feedback, by=by)
                return
            except processes.UnknownRun:
                raise
            except ConfigError:
                if anyio.current_time() >= deadline or not await self._history_allows(run_id, task_id, action):
                    raise
            await anyio.sleep(0.1)

    async def _history_allows(self, run_id: str, task_id: str, action: OverrideAction) -> bool:
        page = RunPage()
        for event in (await self.history_so_far(run_id))[0]:
            page.apply(event)
        if not task_id:
            return action in page.to_json()["actions"]
        return any(t["id"] == task_id and action in t["actions"] for t in page.to_json()["tasks"])


def _row(head: dict[str, Any], started: float | None) -> dict[str, Any]:
    """A run list's row from a summary's head (``processes.fetch_head``)."""
    return {"run_id": head.get("run_id", ""), "goal": head.get("goal", ""), "state": head.get("state", ""),
            "reason": head.get("reason", ""), "tokens": head.get("tokens", 0), "started": started,
            "tasks": head.get("task_count", 0), "by_state": head.get("task_states", {})}


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def redis_run_ids(bus: RedisBus, url: str) -> RunIds:
    """Lists the runs whose summaries a manager keeps in the bus's Redis namespace (a SCAN, never KEYS)."""
    prefix = bus.value_key(run_snapshot_key(""))

    async def run_ids() -> list[str]:
        client = aioredis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
        try:
            keys = [k.decode() if isinstance(k, bytes) else str(k)
                    async for k in client.scan_iter(match=_glob_escape(prefix) + "*", count=1000)]
        except (aioredis.ConnectionError, aioredis.TimeoutError, OSError) as exc:
            raise BusUnavailable(f"cannot reach Redis at {redact_url(url)} to list runs: {exc}") from exc
        finally:
            await client.aclose()
        return [k[len(prefix):] for k in keys]

    return run_ids

