"""Gathered: a loop takes, in one go, everything added while it was busy."""

from __future__ import annotations

import anyio
import pytest

from orchestrator.gathered import Gathered

pytestmark = pytest.mark.timeout(10)


async def test_take_returns_everything_added_since_the_last_take_in_order() -> None:
    gathered: Gathered[int] = Gathered()
    for i in range(3):
        gathered.add(i)
    assert len(gathered) == 3
    assert await gathered.take() == [0, 1, 2]
    assert len(gathered) == 0
    gathered.add(3)
    assert await gathered.take() == [3]


async def test_take_waits_for_an_item_and_items_added_meanwhile_wait_for_the_next_take() -> None:
    gathered: Gathered[str] = Gathered()
    taken: list[list[str]] = []

    async def loop() -> None:
        while True:
            taken.append(await gathered.take())
            await anyio.sleep(0.05)  # busy: what arrives now waits for the next take

    async with anyio.create_task_group() as tg:
        tg.start_soon(loop)
        await anyio.sleep(0.05)
        assert taken == []  # nothing added: take waits
        gathered.add("a")
        await anyio.sleep(0.01)
        gathered.add("b")
        gathered.add("c")
        with anyio.fail_after(2):
            while True:
                if len(taken) == 2:
                    break
                await anyio.sleep(0.01)
        tg.cancel_scope.cancel()
    assert taken == [["a"], ["b", "c"]]
