"""Find processes by ancestry in ``/proc`` and tell whether they are still alive (pid reuse proof).

For the tests that kill a sandbox, a worker or a supervisor and then look for what outlived it.
"""

from __future__ import annotations

import time
from pathlib import Path

import anyio

__all__ = ("Proc", "collect_descendants", "descendants", "living", "wait_until_none_living", "with_environment")

Proc = tuple[int, int]  # (pid, start time in clock ticks): a pid alone may be reused


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(ppid, start time, state) of ``pid``, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return int(fields[1]), int(fields[19]), fields[0]


def descendants(root: int) -> set[Proc]:
    """Every living process below ``root`` right now."""
    parents: dict[int, list[tuple[int, int]]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None and stat[2] != "Z":
            parents.setdefault(stat[0], []).append((int(entry.name), stat[1]))
    found: set[Proc] = set()
    todo = [root]
    while todo:
        for child in parents.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child[0])
    return found


def with_environment(entry: str) -> set[Proc]:
    """Every living process whose environment holds ``entry`` (``NAME=value``); needs root for other users'."""
    found: set[Proc] = set()
    needle = entry.encode() + b"\0"
    for path in Path("/proc").iterdir():
        if not path.name.isdigit():
            continue
        try:
            environ = (path / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ + b"\0" and (stat := _stat(int(path.name))) is not None and stat[2] != "Z":
            found.add((int(path.name), stat[1]))
    return found


def living(procs: set[Proc]) -> set[Proc]:
    """Those of ``procs`` that still exist (not as zombies) with the same start time."""
    alive = set()
    for pid, start in procs:
        stat = _stat(pid)
        if stat is not None and stat[1] == start and stat[2] != "Z":
            alive.add((pid, start))
    return alive


def wait_until_none_living(procs: set[Proc], timeout: float = 10.0) -> set[Proc]:
    """Poll until none of ``procs`` lives or ``timeout`` passes; return the survivors."""
    deadline = time.monotonic() + timeout
    while (alive := living(procs)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


async def collect_descendants(root: int, into: set[Proc], *, every: float = 0.02) -> None:
    """Keep adding ``root``'s descendants to ``into`` until cancelled."""
    while True:
        into |= descendants(root)
        await anyio.sleep(every)
