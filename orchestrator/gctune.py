"""Garbage-collector settings for the manager process.

A manager keeps large, long-lived heaps (the records of every running task, recent histories)
and allocates many short-lived objects per reply. With CPython's default thresholds the cyclic
collector runs every 700 allocations and regularly walks the whole old heap: measured on the
lifecycle benchmark, it took about half of the manager's throughput. Objects that exist when the
manager starts are frozen out of collection, and young collections run less often (every 100,000
allocations: at 20,000, many short runs in flight spent ~20 µs a run in the collector, and a
middle-generation pass over them took ~50 ms at once; ~8 µs a run now, and the manager's memory at
100,000 tasks did not change); the collector still runs, so cyclic garbage is still reclaimed.

Only the ``orchestrator manager`` process (and the benchmark that stands in for it) calls this:
an application embedding the manager keeps its own settings.
"""

from __future__ import annotations

import gc

__all__ = ("tune_gc",)

THRESHOLDS = (100_000, 20, 50)


def tune_gc() -> None:
    """Freeze what exists now and raise the collection thresholds (see the module docstring)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
