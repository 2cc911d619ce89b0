"""Jobs far larger than a person could check by eye: no default cap on their size, a manager whose memory
does not keep every event of a run, and a 2,000-task job file accepted through real processes."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from orchestrator.api import Orchestrator
from orchestrator.job import parse_job
from orchestrator.manager import ManagerSettings
from orchestrator.processes import read_events
from protocol.bus import BusSettings, MemoryBus
from protocol.codec import Codec
from protocol.errors import JobError
from tests._trust import env_without_orch
from workers import Task, Worker

ROOT = Path(__file__).resolve().parents[1]
_SCRIPT = Path(sys.executable).parent / "orchestrator"
COMMAND = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "orchestrator.cli"]


class Echo(Worker):
    capability = "echo"

    async def handle(self, task: Task) -> Any:
        return task.input


def _tasks(n: int) -> list[dict[str, Any]]:
    return [{"id": f"t{i}", "capability": "echo", "input": i, "spec": {"expect": i}} for i in range(n)]


def test_a_job_a_person_wrote_has_no_default_cap_on_its_size() -> None:
    job = parse_job({"goal": "many", "tasks": _tasks(5_000)})
    assert len(job.tasks) == 5_000
    assert job.budget.max_tasks is None


def test_a_job_that_sets_max_tasks_is_held_to_it() -> None:
    with pytest.raises(JobError, match=r"4 tasks exceed budget.max_tasks=3") as caught:
        parse_job({"goal": "capped", "budget": {"max_tasks": 3}, "tasks": _tasks(4)}, source="capped.yaml")
    assert caught.value.field == "tasks"


async def test_a_run_of_more_tasks_than_the_old_cap_is_accepted() -> None:
    async with Orchestrator(workers=[Echo()]) as orch:
        result = await orch.run({"goal": "more than 200", "tasks": _tasks(600)})
    assert result.accepted, result.reason
    assert result.outputs == {f"t{i}": i for i in range(600)}


async def test_a_follower_behind_the_events_kept_in_memory_gets_the_rest_from_the_store() -> None:
    # 40 tasks make 162 events; the manager keeps only the latest 8 to 16 of them in memory.
    async with Orchestrator(workers=[Echo()], manager_settings=ManagerSettings(events_kept=8)) as orch:
        run = await orch.submit({"goal": "long history", "tasks": _tasks(40)})
        assert (await run.wait()).accepted
        log = orch.manager._logs[run.run_id]
        assert log.first_seq > 100
        assert len(log.events) <= 16
        seqs = [event.seq async for event in run.events()]
        from_store = await orch.store.events(run.run_id)
    assert seqs == list(range(1, len(from_store) + 1))
    assert len(seqs) == 2 + 4 * 40  # started, four per task, finished


async def test_followers_get_every_event_but_a_start_too_big_for_one_message() -> None:
    # 8 KiB messages: the start of 300 tasks (~14 KB) cannot be mirrored, and batches of events must be split.
    bus = MemoryBus(BusSettings(codec=Codec(max_frame_bytes=8 * 1024)))

    async with Orchestrator(bus=bus, workers=[Echo()], manager_settings=ManagerSettings(mirror="all")) as orch:
        run = await orch.submit({"goal": "wide", "tasks": _tasks(300)})
        assert (await run.wait()).accepted
        from_store = await orch.store.events(run.run_id)
    # Read after the orchestrator stopped at once: its last commit mirrored the end of the run on the way out,
    # and what the split of a big batch had not sent yet (read as a follower reads: an event sent twice once).
    mirrored = [event.seq for event in await read_events(bus, run.run_id)]
    assert mirrored == [e.seq for e in from_store[1:]]  # in order, nothing lost but the start (seq 1)


def _submit_through_real_processes(redis_url: str, tmp_path: Path, job: Path) -> dict[str, Any]:
    """``orchestrator submit JOB --wait --json`` to a manager process and two noop worker processes."""
    env = env_without_orch(keep_keyring=True)
    env.update(PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""), ORCH_REDIS_URL=redis_url,
               ORCH_NAMESPACE=f"t{uuid.uuid4().hex[:10]}")
    log = (tmp_path / "processes.log").open("ab")
    procs = [subprocess.Popen([*COMMAND, "manager", "--ledger", str(tmp_path / "ledger.db")], cwd=ROOT, env=env,
                              stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)]
    procs += [subprocess.Popen([*COMMAND, "worker", "--capability", "noop", "--plugin", "benchmarks.noop:NoopWorker",
                                "--concurrency", "64"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log,
                               stderr=subprocess.STDOUT) for _ in range(2)]
    try:
        done = subprocess.run([*COMMAND, "submit", str(job), "--wait", "--json"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=540, stdin=subprocess.DEVNULL)
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=30)
        log.close()
    assert done.returncode == 0, done.stderr + (tmp_path / "processes.log").read_text()[-3000:]
    run: dict[str, Any] = json.loads(done.stdout)
    return run


@pytest.mark.redis
@pytest.mark.timeout(600)
def test_a_2000_task_job_file_is_accepted_through_real_processes(redis_url: str, tmp_path: Path) -> None:
    lines = ["goal: two thousand tasks", "tasks:"]
    lines += [f"  - {{id: t{i}, capability: noop, input: {i}, spec: {{expect: {i}}}}}" for i in range(2_000)]
    job = tmp_path / "big.yaml"
    job.write_text("\n".join(lines) + "\n")
    run = _submit_through_real_processes(redis_url, tmp_path, job)
    assert run["state"] == "accepted"
    assert [t["state"] for t in run["tasks"]] == ["accepted"] * 2_000
    assert [t["output"] for t in run["tasks"]] == list(range(2_000))


@pytest.mark.redis
@pytest.mark.timeout(600)
def test_a_job_file_too_big_for_one_bus_message_is_submitted_staged_and_accepted(redis_url: str,
                                                                                  tmp_path: Path) -> None:
    # 2,500 tasks of 500 characters: ~1.3 MB, over the 1 MiB a bus message holds (refused whole before 2026-12-04).
    lines = ["goal: too big for one message", "tasks:"]
    lines += [f"  - {{id: t{i}, capability: noop, input: '{i:05d}{'x' * 500}', spec: {{expect: '{i:05d}{'x' * 500}'}}}}"
              for i in range(2_500)]
    job = tmp_path / "huge.yaml"
    job.write_text("\n".join(lines) + "\n")
    assert job.stat().st_size > 2 * 1024 * 1024
    run = _submit_through_real_processes(redis_url, tmp_path, job)
    assert run["state"] == "accepted", run["reason"]
    assert [t["output"] for t in run["tasks"]] == [f"{i:05d}{'x' * 500}" for i in range(2_500)]
