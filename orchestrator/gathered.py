"""Items gathered for a loop that handles, in one go, whatever arrived while it was busy."""

from __future__ import annotations

from typing import Generic, TypeVar

import anyio

__all__ = ("Gathered",)

T = TypeVar("T")


class Gathered(Generic[T]):
    """``add`` never waits; ``take`` waits for at least one item and returns every item added since the last take.

    For work whose cost is mostly per call rather than per item (a write to the bus, a task): many short
    runs then share one call instead of making one each.
    """

    def __init__(self) -> None:
        self._items: list[T] = []
        self._added = anyio.Event()

    def add(self, item: T) -> None:
        self._items.append(item)
        self._added.set()

    def __len__(self) -> int:
        return len(self._items)

    async def take(self) -> list[T]:
        await self._added.wait()
        self._added = anyio.Event()
        items, self._items = self._items, []
        return items
