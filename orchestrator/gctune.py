"""Garbage-collector settings for the manager process.

A manager keeps large, long-lived heaps (the records of every running task, recent histories)
and allocates many short-lived objects per reply. With CPython's default thresholds the cyclic
collector runs every 700 allocations and regularly walks the whole old heap: measured on the
lifecycle benchmark, it took about half of the manager's throughput. Objects that exist when the
manager starts are frozen out of collection, and young collections run less often: every 500,000
allocations. A young collection walks every object allocated since the last one that is still alive,
so the records of runs in flight were walked once for every 100,000 allocations they lived through
and then again by the middle generation's pass. With thousands of short runs in flight (20,000
one-task runs submitted at once, then awaited) that was ~60 µs a run at 100,000, with one pause of
~0.6 s; at 500,000, most runs end before a collection sees them: ~25 µs a run, the longest pause
~0.2 s. The manager's peak memory at 100,000 tasks stays under 2 KB a task (1,958 bytes; at
1,000,000 it was 2,072). The collector still runs, so cyclic garbage is still reclaimed.

Only the ``orchestrator manager`` and ``orchestrator worker`` processes (and the benchmarks that stand in
for them) call this: an application embedding either keeps its own settings.

A worker's heap is its libraries and plugin, and per task it allocates a few hundred short-lived objects.
With the default thresholds its collections kept walking the libraries' objects: frozen once the plugin
is loaded, and with young collections every 10,000 allocations, a worker draining signed no-op tasks spent
~80 instead of ~95 µs of CPU a task (``benchmarks/worker_drain.py --signed``).
"""

from __future__ import annotations

import gc

__all__ = ("THRESHOLDS", "WORKER_THRESHOLDS", "tune_gc")

THRESHOLDS = (500_000, 20, 50)  # the manager's
WORKER_THRESHOLDS = (10_000, 20, 50)  # a worker's: a plugin's own garbage cycles are reclaimed sooner


def tune_gc(thresholds: tuple[int, int, int] = THRESHOLDS) -> None:
    """Freeze what exists now and raise the collection thresholds (see the module docstring)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*thresholds)
