"""The worker runtime's runner pool: bounded, reused, failing loudly, closable."""

from __future__ import annotations

import anyio
import pytest

from workers.pool import RunnerPool

pytestmark = pytest.mark.timeout(10)


async def test_jobs_run_in_order_on_no_more_runners_than_needed() -> None:
    done: list[int] = []
    started: list[int] = []

    async def job(i: int, gate: anyio.Event) -> None:
        started.append(i)
        await gate.wait()
        done.append(i)

    async with anyio.create_task_group() as tg:
        with RunnerPool(tg, 3) as pool:
            gates = [anyio.Event() for _ in range(5)]
            for i in range(5):
                pool.submit(job, i, gates[i])
            await anyio.wait_all_tasks_blocked()
            assert started == [0, 1, 2]  # three runners, the other jobs queued for the first free one
            assert pool._runners == 3
            for gate in gates:
                gate.set()
            await anyio.wait_all_tasks_blocked()
            assert done == [0, 1, 2, 3, 4]
            for i in range(5, 8):  # one at a time: an idle runner takes each, no new one starts
                gate = anyio.Event()
                gate.set()
                pool.submit(job, i, gate)
                await anyio.wait_all_tasks_blocked()
            assert done == list(range(8))
            assert pool._runners == 3
        await anyio.wait_all_tasks_blocked()
        assert pool._runners == 0  # closed: the idle runners ended


async def test_a_job_that_raises_fails_the_task_group() -> None:
    async def boom() -> None:
        raise ValueError("handler bug")

    async def run_pool() -> None:
        async with anyio.create_task_group() as tg:
            with RunnerPool(tg, 2) as pool:
                pool.submit(boom)
                await anyio.sleep_forever()

    with pytest.raises(ExceptionGroup) as caught:
        await run_pool()
    assert caught.group_contains(ValueError, match="handler bug")


async def test_a_closed_pool_refuses_jobs_but_finishes_those_queued() -> None:
    done: list[str] = []

    async def job(name: str) -> None:
        await anyio.sleep(0.01)
        done.append(name)

    async with anyio.create_task_group() as tg:
        pool = RunnerPool(tg, 1)
        pool.submit(job, "a")
        pool.submit(job, "b")
        pool.close()
        with pytest.raises(RuntimeError, match="closed"):
            pool.submit(job, "c")
    assert done == ["a", "b"]

