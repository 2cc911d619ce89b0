"""Jobs too big for one bus message go through the jobs stream staged: the value, the digest, the manager's checks.

In process here (the in-memory bus keeps the wire's frame limit); tests/security/test_hostile_staged_jobs.py
changes staged jobs with raw redis-py under a real manager process, and tests/test_big_jobs.py submits one
with the CLI.
"""

from __future__ import annotations

from typing import Any

import anyio
import msgpack
import pytest

from orchestrator import processes
from orchestrator.api import Orchestrator
from orchestrator.job import parse_job
from orchestrator.manager import ManagerSettings
from orchestrator.staged_jobs import INLINE_MAX_BYTES, StagedJobError, submission, unstage
from protocol.bus import MemoryBus
from protocol.codec import DEFAULT_MAX_FRAME_BYTES
from protocol.keys import staged_job_key
from workers import Task, Worker


class Echo(Worker):
    capability = "echo"

    async def handle(self, task: Task) -> Any:
        return task.input


def big_job(tasks: int = 2_500, width: int = 500) -> dict[str, Any]:
    """Over the 1 MiB a bus message holds (2,500 tasks of 500 characters: about 1.3 MB)."""
    return {"goal": "too big for one message", "tasks": [
        {"id": f"t{i}", "capability": "echo", "input": f"{i:05d}" + "x" * width, "spec": {"expect": f"{i:05d}" + "x" * width}}
        for i in range(tasks)]}


def test_a_small_job_travels_in_its_submission() -> None:
    job = {"goal": "small", "tasks": [{"id": "a", "capability": "echo"}]}
    submit = anyio.run(lambda: submission(MemoryBus(), "r1", job))
    assert submit.staged is None
    assert submit.job == job


async def test_a_job_too_big_for_one_message_is_staged_run_and_its_value_freed() -> None:
    job = big_job()
    assert len(msgpack.packb(job)) > DEFAULT_MAX_FRAME_BYTES
    async with Orchestrator(workers=[Echo()]) as orch:
        run_id = await processes.submit_job(orch.bus, parse_job(job))
        queued = [env.body for _, env in await orch.bus.read("jobs")]
        assert queued[0].staged is not None
        assert queued[0].staged.tasks == 2_500
        assert queued[0].job == {"goal": "too big for one message"}
        with anyio.fail_after(120):
            status = await processes.wait_for_run(orch.bus, run_id)
        assert status["state"] == "accepted", status["reason"]
        assert len(status["tasks"]) == 2_500
        assert await orch.bus.get_value(staged_job_key(run_id)) is None  # freed once the run was recorded


async def test_a_staged_job_over_the_managers_limit_fails_its_run_naming_the_limit() -> None:
    settings = ManagerSettings(max_job_bytes=INLINE_MAX_BYTES)
    async with Orchestrator(workers=[Echo()], manager_settings=settings) as orch:
        run_id = await processes.submit_job(orch.bus, parse_job(big_job(1_000)))
        with anyio.fail_after(30):
            status = await processes.wait_for_run(orch.bus, run_id)
        assert status["state"] == "failed"
        assert f"over this manager's max_job_bytes ({INLINE_MAX_BYTES})" in status["reason"]
        assert await orch.bus.get_value(staged_job_key(run_id)) is None


async def test_a_staged_job_is_read_only_when_it_matches_its_signed_size_and_digest() -> None:
    bus = MemoryBus()
    submit = await submission(bus, "r1", big_job(1_000))
    assert submit.staged is not None
    staged, key = submit.staged, staged_job_key("r1")
    good = await bus.get_value(key)
    assert good is not None
    assert (await unstage(bus, "r1", staged))["goal"] == "too big for one message"

    await bus.put_value(key, good[:-1] + b"y")  # same size, one byte changed
    with pytest.raises(StagedJobError, match="does not match the size and digest its signed submission names"):
        await unstage(bus, "r1", staged)
    await bus.put_value(key, good + b"more")  # longer: refused before it is read
    with pytest.raises(StagedJobError, match=f"longer than the {staged.size} bytes its signed submission names"):
        await unstage(bus, "r1", staged)
    await bus.delete_value(key)
    with pytest.raises(StagedJobError, match="is gone"):
        await unstage(bus, "r1", staged)
