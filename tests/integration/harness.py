"""Real processes for the fault tests: a redis-server, ``orchestrator manager`` and ``worker`` subprocesses.

Everything is started by the test and killed by pid at the end (``Cluster.close``). Each process
logs JSON at INFO to its own file under ``<tmp>/logs`` so a test can look for log events.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import yaml

from orchestrator import processes
from orchestrator.job import load_job
from protocol.errors import OrchestratorError
from protocol.redis_bus import RedisBus
from tests._redis import RedisServer
from tests._trust import operator_trust
from tests.integration.checker import CheckResult, Fault, check_run
from tests.integration.effects import open_store

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = "tests.integration.effects:EffectWorker"


@dataclass
class Proc:
    """One subprocess the test owns."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, signum: int) -> None:
        if self.alive:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        """SIGKILL by pid and reap."""
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)  # a stopped process must die too
                os.kill(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


@dataclass
class Cluster:
    """A redis-server, a ledger, an effects store, and the managers and workers of one test."""

    tmp: Path
    lease_s: float = 1.0
    manager_lease_s: float = 1.0
    redis: RedisServer = field(init=False)
    procs: list[Proc] = field(default_factory=list)
    _counter: int = 0

    def __post_init__(self) -> None:
        self.redis = RedisServer(self.tmp / "redis", appendonly=True)
        self.ledger = self.tmp / "ledger.db"
        self.store = self.tmp / "effects.db"
        (self.tmp / "logs").mkdir(parents=True, exist_ok=True)
        open_store(self.store).close()
        # supervised worker slots: slot name -> (current proc, kwargs, restarts)
        self.slots: dict[str, Proc] = {}
        self.slot_args: dict[str, dict[str, Any]] = {}
        self.restarts = 0

    @property
    def url(self) -> str:
        return self.redis.url

    def spawn(self, name: str, args: list[str]) -> Proc:
        """Start ``orchestrator ARGS`` with JSON logs to logs/NAME.log; killed by pid in ``close``."""
        log = self.tmp / "logs" / f"{name}.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("ORCH_REDIS_URL", None)
        with log.open("ab") as err:
            popen = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "--log-level", "INFO", "--log-json",
                                      *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=err)
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def _name(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}{self._counter}"

    def manager(self, name: str | None = None, *, exit_after_s: float | None = None) -> Proc:
        name = name or self._name("manager")
        return self.spawn(name, ["manager", "--redis", self.url, "--ledger", str(self.ledger), "--name", name,
                                  "--lease-s", str(self.lease_s), "--manager-lease-s", str(self.manager_lease_s),
                                  *_exit_after(exit_after_s)])

    def worker(self, name: str | None = None, *, concurrency: int = 4, drain_s: float = 5.0,
               lease_s: float | None = None, exit_after_s: float | None = None) -> Proc:
        name = name or self._name("worker")
        return self.spawn(name, ["worker", "--redis", self.url, "--capability", "effect", "--plugin", PLUGIN,
                                  "--config", json.dumps({"store": str(self.store)}),
                                  "--concurrency", str(concurrency), "--name", name,
                                  "--lease-s", str(lease_s or self.lease_s), "--drain-s", str(drain_s),
                                  *_exit_after(exit_after_s)])

    # -- supervised workers ----------------------------------------------------------------

    def supervised_worker(self, slot: str, **kwargs: Any) -> Proc:
        self.slot_args[slot] = kwargs
        self.slots[slot] = proc = self.worker(self._name(f"{slot}-"), **kwargs)
        return proc

    async def supervise(self, *, poll_s: float = 0.1) -> None:
        """Restart a supervised worker whose process died (new consumer name), until cancelled."""
        while True:
            for slot, proc in list(self.slots.items()):
                if not proc.alive:
                    self.restarts += 1
                    self.slots[slot] = self.worker(self._name(f"{slot}-"), **self.slot_args[slot])
            await anyio.sleep(poll_s)

    # -- clients ---------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def bus(self) -> AsyncIterator[RedisBus]:
        async with processes.open_bus(self.url, namespace="orch", lease_s=self.lease_s, retry_budget_s=2.0,
                                      trust=operator_trust()) as bus:
            yield bus

    def write_job(self, name: str, tasks: list[dict[str, Any]], **budget: Any) -> Path:
        """A job file in the test's tmp dir (YAML), as a user would write it."""
        job = {"goal": f"fault test {name}", "budget": {"max_tasks": 1000, "max_attempts": 10, "deadline_s": 120,
                                                         **budget},
               "tasks": tasks}
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(job, sort_keys=False))
        return path

    async def submit(self, path: Path) -> str:
        async with self.bus() as bus:
            return await processes.submit_job(bus, load_job(path), source=str(path))

    async def status(self, run_id: str) -> dict[str, Any] | None:
        try:
            async with self.bus() as bus:
                return await processes.fetch_status(bus, run_id)
        except OrchestratorError:
            return None  # Redis down for the moment

    async def wait(self, run_id: str, timeout: float = 60.0) -> dict[str, Any]:
        """The run's final status; fails the test when it has not ended in ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            last = await self.status(run_id) or last
            if last is not None and last["state"] != "running":
                return last
            await anyio.sleep(0.2)
        counts: dict[str, int] = {}
        for t in (last or {}).get("tasks", []):
            counts[t["state"]] = counts.get(t["state"], 0) + 1
        raise AssertionError(f"run {run_id} did not end within {timeout}s; last status: {counts}; logs in "
                             f"{self.tmp / 'logs'}")

    async def accepted_count(self, run_id: str) -> int:
        status = await self.status(run_id)
        return 0 if status is None else sum(1 for t in status["tasks"] if t["state"] == "accepted")

    async def until_accepted(self, run_id: str, count: int, timeout: float = 30.0) -> bool:
        """Wait until at least ``count`` of the run's tasks are accepted (a fault then lands under load).

        Returns False, at once, when the run has ended first: workers keep working while a manager is
        down, so a run can finish before the count a test aimed for.
        """
        with anyio.fail_after(timeout):
            while True:
                status = await self.status(run_id)
                if status is not None and status["state"] != "running":
                    return False
                if status is not None and sum(t["state"] == "accepted" for t in status["tasks"]) >= count:
                    return True
                await anyio.sleep(0.05)

    def executions(self, run_id: str) -> list[tuple[str, int, int]]:
        db = open_store(self.store)
        try:
            return [tuple(r) for r in db.execute("SELECT task_id, attempt, pid FROM executions WHERE run_id = ?",
                                                 (run_id,))]  # type: ignore[misc]
        finally:
            db.close()

    def check(self, status: dict[str, Any], submitted: int, faults: list[Fault] = ()) -> CheckResult:  # type: ignore[assignment]
        result = check_run(status, ledger=self.ledger, store=self.store, submitted=submitted, faults=list(faults))
        print(result.line())
        return result

    def close(self) -> None:
        """Kill every process this test started, by pid, then the redis-server."""
        for proc in self.procs:
            proc.kill()
        self.redis.kill()


def _exit_after(seconds: float | None) -> list[str]:
    return [] if seconds is None else ["--exit-after-s", str(seconds)]


def effect_tasks(n: int, *, prefix: str = "t", sleep: float = 0.0, **extra: Any) -> list[dict[str, Any]]:
    """``n`` effect tasks whose output must equal their id."""
    tasks = []
    for i in range(n):
        task_id = f"{prefix}{i:03d}"
        data: dict[str, Any] = {"sleep": sleep} if sleep else {}
        tasks.append({"id": task_id, "capability": "effect", "input": {**data, **extra} or None,
                      "spec": {"expect": task_id}})
    return tasks
