"""Jobs too big for one bus message go through the jobs stream staged: the value, the digest, the manager's checks.

In process here (the in-memory bus keeps the wire's frame limit); tests/security/test_hostile_staged_jobs.py
changes staged jobs with raw redis-py under a real manager process, and tests/test_big_jobs.py submits one
with the CLI.
"""

from __future__ import annotations

import gc
import hashlib
from typing import Any

import anyio
import msgpack
import pytest

from orchestrator import processes
from orchestrator.api import Orchestrator
from orchestrator.job import TaskDef, parse_job, parse_job_in_parts
from orchestrator.manager import ManagerSettings
from orchestrator.staged_jobs import INLINE_MAX_BYTES, StagedJobError, submission, unstage
from protocol.bus import MemoryBus
from protocol.codec import DEFAULT_MAX_FRAME_BYTES
from protocol.envelope import Envelope
from protocol.errors import JobError
from protocol.keys import staged_job_key
from protocol.limits import JOB_LIMITS, ShapeLimits
from tests.security.attacker import nested
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


def split(job: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """A job as ``submission`` takes it: its header, and its tasks."""
    return {k: v for k, v in job.items() if k != "tasks"}, job["tasks"]


def test_a_small_job_travels_in_its_submission() -> None:
    job = {"goal": "small", "tasks": [{"id": "a", "capability": "echo"}]}
    submit = anyio.run(lambda: submission(MemoryBus(), "r1", *split(job)))
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
    submit = await submission(bus, "r1", *split(big_job(1_000)))
    assert submit.staged is not None
    staged, key = submit.staged, staged_job_key("r1")
    good = await bus.get_value(key)
    assert good is not None
    header, tasks = await unstage(bus, "r1", staged)
    assert header["goal"] == "too big for one message"
    assert [t["id"] for t in tasks] == [f"t{i}" for i in range(1_000)]

    await bus.put_value(key, good[:-1] + b"y")  # same size, one byte changed
    with pytest.raises(StagedJobError, match="does not match the size and digest its signed submission names"):
        await unstage(bus, "r1", staged)
    await bus.put_value(key, good + b"more")  # longer: refused before it is read
    with pytest.raises(StagedJobError, match=f"longer than the {staged.size} bytes its signed submission names"):
        await unstage(bus, "r1", staged)
    await bus.delete_value(key)
    with pytest.raises(StagedJobError, match="is gone"):
        await unstage(bus, "r1", staged)


async def test_a_bad_task_in_a_staged_job_fails_the_run_naming_the_task_and_field() -> None:
    job = big_job(1_000)
    job["tasks"][700]["max_attempts"] = 0  # a validated Job could not hold it: as a client around the CLI sends it
    async with Orchestrator(workers=[Echo()]) as orch:
        submit = await submission(orch.bus, "r-bad", *split(job))
        assert submit.staged is not None
        await orch.bus.publish("jobs", Envelope(run_id="r-bad", body=submit))
        with anyio.fail_after(30):
            status = await processes.wait_for_run(orch.bus, "r-bad")
    assert status["state"] == "failed"
    assert "task 't700'" in status["reason"]
    assert "max_attempts" in status["reason"]


async def test_staged_bytes_that_are_not_msgpack_are_refused_by_name() -> None:
    bus = MemoryBus()
    submit = await submission(bus, "r2", *split(big_job(1_000)))
    assert submit.staged is not None
    key = staged_job_key("r2")
    good = await bus.get_value(key)
    assert good is not None
    garbage = good[:1000] + b"\xc1" + good[1001:]  # 0xc1: never used in msgpack
    await bus.put_value(key, garbage)
    forged = submit.staged.model_copy(update={"digest": hashlib.blake2b(garbage, digest_size=32).hexdigest()})
    _, tasks = await unstage(bus, "r2", forged)  # as a signed submission of bad bytes would name them
    with pytest.raises(StagedJobError, match="is not valid msgpack"):
        list(tasks)


def test_a_job_read_in_parts_names_a_bad_task_by_id_or_by_place() -> None:
    tasks = [{"id": "a", "capability": "echo"}, {"capability": "echo"}]
    with pytest.raises(JobError, match=r"task '#2'.*id.*is required"):
        parse_job_in_parts({"goal": "g"}, iter(tasks), source="staged")
    with pytest.raises(JobError, match=r"task 'b'.*capability"):
        parse_job_in_parts({"goal": "g"}, iter([{"id": "b", "capability": ""}]))
    with pytest.raises(JobError, match="a job must be a mapping"):
        parse_job_in_parts(["not", "a", "map"], iter(()))
    with pytest.raises(JobError, match="nests deeper than"):
        parse_job_in_parts({"goal": "g"}, iter([{"id": "c", "capability": "echo", "input": nested(100)}]))
    job = parse_job_in_parts({"goal": "g", "budget": {"max_attempts": 2}}, iter(tasks[:1]))
    assert (job.goal, [t.id for t in job.tasks], job.budget.max_attempts) == ("g", ["a"], 2)


def test_a_job_read_in_parts_is_bounded_as_a_whole_job_is() -> None:
    # Each task within the limits, all of them together not: the total is the job's, as parse_job counts it.
    limits = ShapeLimits(max_depth=8, max_items=100)
    tasks = [{"id": f"t{i}", "capability": "echo", "input": list(range(60))} for i in range(2)]
    parse_job_in_parts({"goal": "g"}, iter(tasks[:1]), limits=limits)
    with pytest.raises(JobError, match="the job holds more than 100 values"):
        parse_job_in_parts({"goal": "g"}, iter(tasks), limits=limits)
    # A task's data sits two levels down in a whole job: the same input is refused in parts as it is whole.
    deep = {"goal": "g", "tasks": [{"id": "d", "capability": "echo", "input": nested(JOB_LIMITS.max_depth - 2)}]}
    with pytest.raises(JobError, match="nests deeper than"):
        parse_job(deep)
    with pytest.raises(JobError, match="nests deeper than"):
        parse_job_in_parts({"goal": "g"}, iter(deep["tasks"]))


async def test_a_goal_too_big_for_one_message_is_staged_with_the_job_and_kept_whole() -> None:
    goal = "g" * (2 * 1024 * 1024)
    async with Orchestrator(workers=[Echo()]) as orch:
        run_id = await processes.submit_job(orch.bus, parse_job({"goal": goal, "tasks": [
            {"id": "a", "capability": "echo", "input": 1, "spec": {"expect": 1}}]}))
        queued = [env.body for _, env in await orch.bus.read("jobs")]
        assert queued[0].job == {"goal": "g" * 200}  # what status shows while it waits
        with anyio.fail_after(30):
            status = await processes.wait_for_run(orch.bus, run_id)
    assert status["state"] == "accepted", status["reason"]
    assert status["goal"] == goal


class Held(Worker):
    """Takes its tasks and holds them until released: the run stays under way."""

    capability = "echo"

    def __init__(self) -> None:
        super().__init__()
        self.taken = anyio.Event()
        self.release = anyio.Event()

    async def handle(self, task: Task) -> Any:
        self.taken.set()
        await self.release.wait()
        return task.input


@pytest.mark.parametrize("tasks", [3, 2_500], ids=["inline", "staged"])
async def test_the_manager_keeps_no_submitted_task_definitions_once_the_run_is_under_way(tasks: int) -> None:
    # The run's records hold what each task needs; the job's own list of definitions is a second copy (~0.4 KB a
    # task), which the manager's loop over the jobs stream kept until another submission came.
    held = Held()
    job = big_job(tasks)
    async with Orchestrator(workers=[held]) as orch:
        run_id = await processes.submit_job(orch.bus, parse_job(job))
        with anyio.fail_after(60):
            await held.taken.wait()
            while (await processes.fetch_head(orch.bus, run_id) or {}).get("state") != "running":  # noqa: ASYNC110 (the summary is the bus's)
                await anyio.sleep(0.01)
        gc.collect()
        alive = sum(1 for o in gc.get_objects() if type(o) is TaskDef)
        held.release.set()
        with anyio.fail_after(120):
            status = await processes.wait_for_run(orch.bus, run_id)
    assert alive == 0
    assert status["state"] == "accepted", status["reason"]
