"""Run summaries for ``status`` on other machines, rebuilt only where a task changed.

A summary of a big run is the whole run as JSON. Rendering every task each time made the
manager's snapshot refresh cost O(tasks) of Python work twice a second; here the JSON of each block
of ``BLOCK`` consecutive tasks is kept until an event about one of them is recorded, so a refresh
costs the blocks that changed plus a join. Blocks, not tasks: one bytes object and no dict entry per
task was ~80 bytes a task of a 100,000-task run's memory; re-rendering a block's unchanged tasks
costs little, as the tasks that change at once are mostly neighbours (dispatch follows the job's order).

The join still makes the whole summary, and a 100,000-task run's is about 25 MB: written to Redis
twice a second, that was a tenth of the manager's time and 50 MB/s of writes. So a run's next
summary is due no sooner than its last one's size allows at ``bytes_per_s`` (a small run's at once,
a 100,000-task run's after about 12 s); the final summary of a run is never held back.

A summary is rendered as its parts (the cached pieces, in order), not joined: the bus writes a big one
a piece at a time (``Bus.put_values_in_parts``), so no 25 MB copy of it is made, by the join, by the
client or by the socket's buffer.

A whole block that is not expected to change soon is kept compressed (zlib) and inflated only as its part is
read: one rendered for the first time (a big run's tasks past its dispatch window wait, unchanged, for a long
while), and one whose tasks have all ended (they change only when a person overrides one). A block rendered
again because a task of it changed stays as it is while it has a task under way. Uncompressed, the cache was
~230 bytes a task of a big run's memory from its start (~4 bytes a no-op task compressed; text compresses
less). Compressing a 256-task block costs ~0.2 ms; inflating one ~0.06 ms a write.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator, Sequence
from itertools import islice
from typing import NamedTuple, cast, overload

from orchestrator.records import RunRecord, TaskRecord

__all__ = ("BLOCK", "TASKS_START", "Snapshots", "Summary")

BLOCK = 256  # tasks a cached piece of JSON covers
TASKS_START = b', "tasks": ['  # where a summary's head ends and its tasks begin (processes.fetch_head reads up to it)


class _Packed(NamedTuple):
    """A block's JSON compressed, and its length inflated."""

    data: bytes
    size: int


class _Block(NamedTuple):
    first: str  # its first task's id
    tasks: int  # its number of tasks
    json: bytes | _Packed  # its tasks' JSON joined with ", "; compressed while not expected to change (_block)

    @property
    def size(self) -> int:
        return self.json.size if isinstance(self.json, _Packed) else len(self.json)


class Summary(Sequence[bytes]):
    """A rendered summary's parts, to be joined; a compressed block's part is inflated each time it is read."""

    __slots__ = ("_parts", "size")

    def __init__(self, parts: list[bytes | _Packed], size: int) -> None:
        self._parts = parts
        self.size = size  # the joined summary's length

    def __len__(self) -> int:
        return len(self._parts)

    def __iter__(self) -> Iterator[bytes]:
        return map(_inflated, self._parts)

    @overload
    def __getitem__(self, index: int) -> bytes: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[bytes]: ...

    def __getitem__(self, index: int | slice) -> bytes | Sequence[bytes]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self._parts)))]
        return _inflated(self._parts[index])


class _RunCache:
    """One run's cached blocks, by position in the run's task order, and the tasks changed since the last render."""

    __slots__ = ("blocks", "changed")

    def __init__(self) -> None:
        self.blocks: list[_Block] = []
        self.changed: set[str] = set()


class Snapshots:
    """Cached task JSON of the runs a manager holds, a block of tasks at a time."""

    def __init__(self, *, bytes_per_s: float = 2_000_000.0) -> None:
        self.bytes_per_s = bytes_per_s
        self._runs: dict[str, _RunCache] = {}
        self._not_before: dict[str, float] = {}  # monotonic time the run's next summary is due

    def due(self, run_id: str, now: float) -> bool:
        """Whether a refresh of the run's summary may be rendered at ``now`` (monotonic seconds)."""
        return now >= self._not_before.get(run_id, 0.0)

    def changed(self, run_id: str, task_id: str) -> None:
        """Forget the task's cached JSON: an event about it was recorded."""
        cache = self._runs.get(run_id)
        if cache is not None:
            cache.changed.add(task_id)

    def forget(self, run_id: str) -> None:
        """The run was let go."""
        self._runs.pop(run_id, None)
        self._not_before.pop(run_id, None)

    def warm(self, run: RunRecord, *, blocks_per_step: int = 16) -> Iterator[None]:
        """Render the blocks of the run not cached yet, ``blocks_per_step`` at a time between the steps of this
        iterator: the caller lets other work run between steps. A block whose task changes meanwhile is
        rendered again by ``render`` (the change is recorded), so warming never makes a summary stale."""
        blocks = self._runs.setdefault(run.run_id, _RunCache()).blocks
        for index, chunk in enumerate(_chunks(run)):
            if index >= len(blocks):
                blocks.append(_block(chunk, first=True))
                if (index + 1) % blocks_per_step == 0:
                    yield

    def render(self, run: RunRecord, *, now: float) -> Sequence[bytes]:
        """The run's summary (``RunRecord.summary()``) as JSON in parts to be joined, rendered at ``now``
        (monotonic seconds). The parts do not change, so they may be written after the run has moved on: they
        are the summary of this moment."""
        cache = self._runs.setdefault(run.run_id, _RunCache())
        changed, blocks = cache.changed, cache.blocks
        head = _dumps(run.summary(with_tasks=False))
        parts: list[bytes | _Packed] = [head[:-1], TASKS_START]
        size = len(head) - 1 + len(TASKS_START) + len(b"]}")
        count = packed = 0
        for index, chunk in enumerate(_chunks(run)):
            known = blocks[index] if index < len(blocks) else None
            if (known is None or known.first != chunk[0].id or known.tasks != len(chunk)
                    or any(task.id in changed for task in chunk)):
                known = _block(chunk, first=known is None)
                if index < len(blocks):
                    blocks[index] = known
                else:
                    blocks.append(known)
            parts += (known.json, b", ")
            size += known.size + 2
            packed += isinstance(known.json, _Packed)
            count = index + 1
        del blocks[count:]
        changed.clear()
        if count:
            parts.pop()  # the last separator
            size -= 2
        parts.append(b"]}")
        self._not_before[run.run_id] = now + size / self.bytes_per_s
        # A plain list when nothing is compressed (every small run): the bus reads it as it did, at no cost.
        return Summary(parts, size) if packed else cast("list[bytes]", parts)


def _dumps(value: object) -> bytes:
    return json.dumps(value, default=str).encode()


def _chunks(run: RunRecord) -> Iterator[list[TaskRecord]]:
    """The run's tasks in order, ``BLOCK`` at a time."""
    tasks = iter(run.tasks.values())
    while chunk := list(islice(tasks, BLOCK)):
        yield chunk


def _block(chunk: list[TaskRecord], *, first: bool = False) -> _Block:
    """The chunk's JSON; compressed when it is a whole block rendered for the first time or of ended tasks."""
    block = _Block(chunk[0].id, len(chunk), b", ".join(_dumps(task.summary()) for task in chunk))
    # Whole blocks only: a run of a few tasks saves little, and zlib takes ~35 µs to set up for any input, a tenth
    # of what a one-task run costs the manager in all.
    return _packed(block) if len(chunk) == BLOCK and (first or all(task.terminal for task in chunk)) else block


def _inflated(part: bytes | _Packed) -> bytes:
    return zlib.decompress(part.data) if isinstance(part, _Packed) else part


def _packed(block: _Block) -> _Block:
    assert isinstance(block.json, bytes)
    return block._replace(json=_Packed(zlib.compress(block.json, 1), len(block.json)))
