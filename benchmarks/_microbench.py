"""Timing for the in-process A/B benchmarks (``shape_check.py``, ``reply_auth.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any


def per_call_us(fn: Callable[[], Any], n: int) -> float:
    """Microseconds per call of ``fn``, over a batch of ``n`` calls back to back."""
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6
