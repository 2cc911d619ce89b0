"""Fault injection per generation request: a scripted queue first, then random draws by rate."""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable
from typing import Literal, get_args

from .config import FaultRates

__all__ = ("Fault", "FaultInjector")

Fault = Literal["server_error", "unavailable", "rate_limited", "hang", "malformed", "truncate", "mid_stream_error"]
FAULTS: tuple[Fault, ...] = get_args(Fault)


class FaultInjector:
    """Decides which fault, if any, hits the next generation request."""

    def __init__(self, rates: FaultRates, seed: int = 0) -> None:
        self.rates = rates
        self._script: deque[Fault | None] = deque()
        self._rng = random.Random(seed)

    def script(self, faults: Iterable[Fault | None]) -> None:
        """Queue faults for the next requests, in order (``None`` lets one request through)."""
        for fault in faults:
            if fault is not None and fault not in FAULTS:
                raise ValueError(f"unknown fault {fault!r}; expected one of {FAULTS}")
            self._script.append(fault)

    def set_rates(self, rates: FaultRates) -> None:
        """Replace the random fault rates."""
        self.rates = rates

    def clear(self) -> None:
        """No more faults: empty the script and zero the rates."""
        self._script.clear()
        self.rates = FaultRates()

    def draw(self) -> Fault | None:
        """The fault for the next request."""
        if self._script:
            return self._script.popleft()
        roll = self._rng.random()
        for name in FAULTS:
            rate: float = getattr(self.rates, name)
            if roll < rate:
                return name
            roll -= rate
        return None
