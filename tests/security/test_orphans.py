"""Nothing outlives what started it: ``kill -9`` of a worker mid-snippet, of the ``fleet up`` supervisor, and
a second ``fleet up`` beside a running one. Real processes, a real redis-server, ``/proc`` scanned after.

Before the fix, seven worker kills left nine sandbox processes behind, a killed supervisor left the
whole fleet running, and a second ``fleet up`` started a second fleet.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from orchestrator import processes
from orchestrator.fleet.supervisor import read_state
from orchestrator.job import load_job
from orchestrator.trust import INSECURE
from tests._proc_scan import Proc, descendants, wait_until_none_living, with_environment
from tests._redis import RedisServer, redis_server_path
from tests._trust import env_without_orch

ROOT = Path(__file__).resolve().parents[2]
MARK = f"orphans-{os.getpid()}"
pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(150),
              pytest.mark.skipif(sys.platform != "linux", reason="parent-death signals and /proc are Linux's"),
              pytest.mark.skipif(redis_server_path() is None, reason="redis-server is not on PATH")]

# Each snippet also double-forks a session leader of its own, which a process-group kill misses.
SLEEPER = """
import os, time
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        time.sleep(120)
    os._exit(0)
time.sleep(120)
result = 1
"""



def env() -> dict[str, str]:
    e = env_without_orch(keep_keyring=False)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), e.get("PYTHONPATH", "")])
    e["ORCH_INSECURE"] = "1"  # these tests are about processes, not message signing
    return e


def write_manifest(tmp_path: Path, redis_url: str, *, concurrency: int = 3) -> Path:
    data = {"apiVersion": "orchestrator.dev/v1", "kind": "Fleet", "metadata": {"name": "orphans"},
            "spec": {"namespace": f"orph{os.getpid()}", "leaseSeconds": 2, "redis": {"url": redis_url},
                     "ledger": {"path": str(tmp_path / "ledger.db")}, "manager": {"leaseSeconds": 2},
                     "workers": [{"capability": "python", "plugin": "python", "replicas": 1,
                                  "concurrency": concurrency,
                                  "config": {"timeout_s": 120, "max_timeout_s": 300, "env": {"ORPHAN_MARK": MARK}}}],
                     "supervisor": {"backoffSeconds": 0.2, "stableSeconds": 30, "maxQuickRestarts": 20,
                                    "gracePeriodSeconds": 3}}}
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def write_job(tmp_path: Path, tasks: int) -> Path:
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"goal": "sleep in sandboxes", "tasks": [
        {"id": f"sleep{i}", "capability": "python", "instruction": SLEEPER, "timeout_s": 200} for i in range(tasks)]}))
    return job


def fleet_up(tmp_path: Path, manifest: Path, output: str = "fleet.out") -> subprocess.Popen[str]:
    """``orchestrator fleet up`` with its stdout and stderr in ``tmp_path / output``."""
    with (tmp_path / output).open("a") as out:
        return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "fleet", "up", str(manifest),
                                 "--state-file", str(tmp_path / "state.json"), "--log-dir", str(tmp_path / "logs")],
                                cwd=tmp_path, env=env(), stdout=out, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def running_pids(state_file: Path) -> dict[str, int] | None:
    try:
        state = read_state(state_file)
    except (OSError, ValueError):
        return None
    procs = {p["name"]: p for p in state["processes"]}
    if procs and all(p["state"] == "running" for p in procs.values()):
        return {name: p["pid"] for name, p in procs.items()}
    return None


def sandbox_processes() -> set[Proc]:
    """Every process of these tests' sandboxes, wherever it went (the mark is in their environment)."""
    return with_environment(f"ORPHAN_MARK={MARK}")


def sandboxes_running(count: int) -> set[Proc] | None:
    """The sandbox processes once ``count`` snippets run (each at least its own process and its escapee)."""
    found = sandbox_processes()
    return found if len(found) >= 2 * count else None


async def submit(redis_url: str, manifest: Path, job: Path) -> str:
    namespace = yaml.safe_load(await anyio.Path(manifest).read_text())["spec"]["namespace"]
    async with processes.open_bus(redis_url, namespace=namespace, lease_s=2, trust=INSECURE) as bus:
        return await processes.submit_job(bus, load_job(job))


def stop(fleet: subprocess.Popen[str]) -> None:
    if fleet.poll() is None:
        fleet.send_signal(signal.SIGTERM)
    try:
        fleet.wait(timeout=30)
    except subprocess.TimeoutExpired:
        fleet.kill()
        fleet.wait()


async def test_sandboxes_die_with_a_killed_worker(tmp_path: Path, redis_server: RedisServer) -> None:
    manifest = write_manifest(tmp_path, redis_server.url)
    state_file = tmp_path / "state.json"
    fleet = fleet_up(tmp_path, manifest)
    try:
        await anyio.to_thread.run_sync(wait_for, lambda: running_pids(state_file), 60, "the fleet to run")
        await submit(redis_server.url, manifest, write_job(tmp_path, 3))
        for kill in range(3):  # each kill, the manager hands the tasks to the restarted worker
            worker = await anyio.to_thread.run_sync(
                wait_for, lambda: (pids := running_pids(state_file)) and pids["worker-python-0"], 60,
                "the worker to run")
            await anyio.to_thread.run_sync(wait_for, lambda: sandboxes_running(3), 60,
                                           f"three sandboxes under the worker (kill {kill + 1})")
            await anyio.sleep(0.5)  # the escapees have forked and left their session
            sandbox = descendants(worker) | sandbox_processes()
            os.kill(worker, signal.SIGKILL)
            survivors = await anyio.to_thread.run_sync(wait_until_none_living, sandbox, 10.0)
            assert survivors == set(), f"kill {kill + 1}: {len(survivors)} sandbox processes outlived the worker"
            await anyio.to_thread.run_sync(
                wait_for, lambda w=worker: (pids := running_pids(state_file)) and pids["worker-python-0"] != w, 60,
                "the worker's restart")
    finally:
        stop(fleet)


async def test_the_fleet_dies_with_a_killed_supervisor(tmp_path: Path, redis_server: RedisServer) -> None:
    manifest = write_manifest(tmp_path, redis_server.url, concurrency=2)
    state_file = tmp_path / "state.json"
    fleet = fleet_up(tmp_path, manifest)
    try:
        pids = await anyio.to_thread.run_sync(wait_for, lambda: running_pids(state_file), 60, "the fleet to run")
        await submit(redis_server.url, manifest, write_job(tmp_path, 2))
        assert pids["worker-python-0"]
        await anyio.to_thread.run_sync(wait_for, lambda: sandboxes_running(2), 60, "two sandboxes under the worker")
        await anyio.sleep(0.5)
        fleet_processes = descendants(fleet.pid) | sandbox_processes()
        assert len(fleet_processes) >= 2 + 2 * 2  # manager, worker, two sandboxes and their escapees
        os.kill(fleet.pid, signal.SIGKILL)
        fleet.wait()
        # SIGTERM reaches the manager and worker, which drain (the worker for 2/3 of the grace period).
        survivors = await anyio.to_thread.run_sync(wait_until_none_living, fleet_processes, 20.0)
        assert survivors == set(), f"{len(survivors)} processes outlived the supervisor: {sorted(survivors)}"
    finally:
        stop(fleet)


def test_a_second_fleet_up_refuses_and_names_the_first(tmp_path: Path, redis_server: RedisServer) -> None:
    manifest = write_manifest(tmp_path, redis_server.url, concurrency=1)
    state_file = tmp_path / "state.json"
    first = fleet_up(tmp_path, manifest)
    second: subprocess.Popen[str] | None = None
    try:
        wait_for(lambda: running_pids(state_file), 60, "the first fleet to run")
        second = fleet_up(tmp_path, manifest, "second.out")
        with contextlib.suppress(subprocess.TimeoutExpired):
            second.wait(timeout=30)
        err = (tmp_path / "second.out").read_text()
        assert second.returncode == 1, err
        assert f"already running under supervisor pid {first.pid}" in err
        assert first.poll() is None  # the first one is untouched
        assert (tmp_path / "state.json").exists()

        # A crash leaves the lock file behind; the lock itself goes with the process.
        first_processes = descendants(first.pid)
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
        assert wait_until_none_living(first_processes, 20.0) == set()
        assert (tmp_path / "state.lock").read_text().strip() == str(first.pid)
        third = fleet_up(tmp_path, manifest)
        try:
            pids = wait_for(lambda: (p := running_pids(state_file)) and read_state(state_file)["supervisor_pid"]
                            == third.pid and p, 60, "a new fleet after the crash")
            assert pids["manager"] not in {pid for pid, _ in first_processes}
        finally:
            stop(third)
        assert third.returncode == 0, (tmp_path / "fleet.out").read_text()[-3000:]
    finally:
        stop(first)
        if second is not None:
            stop(second)
