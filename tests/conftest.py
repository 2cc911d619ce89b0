"""Shared fixtures: one bus fixture per implementation, so the contract suite runs against each."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from protocol.bus import Bus, BusSettings, MemoryBus

BusFactory = Callable[[BusSettings], Awaitable[Bus]]

FAST = BusSettings(lease_s=0.3, max_deliveries=3, block_s=0.05)


async def _memory_bus(settings: BusSettings) -> Bus:
    return MemoryBus(settings)


BUS_FACTORIES: dict[str, BusFactory] = {"memory": _memory_bus}


@pytest.fixture(params=sorted(BUS_FACTORIES))
def bus_factory(request: pytest.FixtureRequest) -> BusFactory:
    """Each bus implementation, by name."""
    return BUS_FACTORIES[request.param]


@pytest.fixture
async def bus(bus_factory: BusFactory) -> AsyncIterator[Bus]:
    """A bus with short leases, so reclaim and dead-letter tests run in fractions of a second."""
    async with await bus_factory(FAST) as b:
        yield b
