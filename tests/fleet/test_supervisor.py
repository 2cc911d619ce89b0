"""``fleet up`` for real: a throwaway redis-server, the vLLM simulator in place of `vllm serve`, real processes."""

from __future__ import annotations

import json
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
from orchestrator.fleet.keys import ensure_keyring, hand_out
from orchestrator.fleet.manifest import load_manifest
from orchestrator.fleet.supervisor import Supervisor, read_state
from orchestrator.job import load_job
from tests._redis import RedisServer, free_port, redis_server_path
from tests._trust import env_without_orch, operator_trust

ROOT = Path(__file__).resolve().parents[2]
PLUGIN = ROOT / "examples" / "slugify-plugin"
pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(90),
              pytest.mark.skipif(redis_server_path() is None, reason="redis-server is not on PATH")]



def env() -> dict[str, str]:
    e = env_without_orch(keep_keyring=True)
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(PLUGIN), e.get("PYTHONPATH", "")])
    e["ORCH_VLLM_BINARY"] = f"{sys.executable} -m orchestrator.simulator"  # stands in for `vllm serve`
    return e


def manifest(tmp_path: Path, redis_url: str, workers: list[dict[str, Any]], **supervisor: Any) -> Path:
    data = {"apiVersion": "orchestrator.dev/v1", "kind": "Fleet", "metadata": {"name": "proof"},
            "spec": {"namespace": f"p{os.getpid()}", "leaseSeconds": 2, "redis": {"url": redis_url},
                     "llm": {"serve": {"model": "sim-model", "port": free_port(), "startupTimeoutSeconds": 30,
                                       "args": ["--time-scale", "0.01"]}},
                     "ledger": {"path": str(tmp_path / "ledger.db")}, "manager": {"leaseSeconds": 2},
                     "workers": workers,
                     "supervisor": {"backoffSeconds": 0.2, "stableSeconds": 30, "maxQuickRestarts": 3,
                                    "gracePeriodSeconds": 5, **supervisor}}}
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def wait_state(path: Path, predicate: Any, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        if path.exists():
            try:
                state = read_state(path)
            except ValueError:
                state = {}
            if state and predicate({p["name"]: p for p in state["processes"]}):
                return state
        time.sleep(0.1)
    raise AssertionError(f"fleet state never matched; last: {json.dumps(state, indent=1)}")


async def test_fleet_survives_a_killed_worker_and_the_run_is_accepted(tmp_path: Path,
                                                                      redis_server: RedisServer) -> None:
    path = manifest(tmp_path, redis_server.url, [
        {"capability": "python", "plugin": "python", "replicas": 1, "concurrency": 2},
        {"capability": "slugify", "plugin": "orchestrator_slugify:SlugifyWorker", "replicas": 2},
        {"capability": "llm", "replicas": 1},
    ])
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"goal": "survive a crash", "tasks": [
        {"id": "slow", "capability": "python", "instruction": "import time\ntime.sleep(3)\nresult = 42",
         "spec": {"expect": 42}},
        {"id": "slug", "capability": "slugify", "input": "Hello Fleet", "spec": {"expect": "hello-fleet"}}]}))
    state_file = tmp_path / "state.json"
    fleet = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "fleet", "up", str(path), "--state-file",
                              str(state_file), "--log-dir", str(tmp_path / "logs")],
                             cwd=tmp_path, env=env())
    try:
        state = wait_state(state_file, lambda ps: len(ps) == 6 and all(p["state"] == "running" for p in ps.values()))
        assert {"vllm", "manager", "worker-python-0", "worker-slugify-0", "worker-slugify-1", "worker-llm-0"} == {
            p["name"] for p in state["processes"]}
        victim = next(p for p in state["processes"] if p["name"] == "worker-python-0")
        await anyio.sleep(1.0)  # the manager takes the lead and the workers subscribe
        m = load_manifest(path, environ={}, plugins=False, services=False)
        # fleet up handed out shares of the session keyring (ORCH_KEYS); the client signs as its operator
        async with processes.open_bus(redis_server.url, namespace=m.spec.namespace, lease_s=2,
                                      trust=operator_trust()) as bus:
            run_id = await processes.submit_job(bus, load_job(job))
            with anyio.fail_after(20):
                while (status := await processes.fetch_status(bus, run_id)) is None or not any(
                        t["id"] == "slow" and t["state"] == "not_done" for t in status["tasks"]):
                    await anyio.sleep(0.1)
            await anyio.sleep(1.0)  # the python worker is inside time.sleep(3)
            os.kill(victim["pid"], signal.SIGKILL)
            restarted = wait_state(state_file, lambda ps: ps["worker-python-0"]["restarts"] >= 1
                                   and ps["worker-python-0"]["state"] == "running")
            assert restarted
            assert next(p for p in restarted["processes"]
                                      if p["name"] == "worker-python-0")["pid"] != victim["pid"]
            with anyio.fail_after(45):
                result = await processes.wait_for_run(bus, run_id)
        assert result["state"] == "accepted", result
        out = subprocess.run([sys.executable, "-m", "orchestrator.cli", "fleet", "status", "--json", "--state-file",
                              str(state_file)],
                             capture_output=True, text=True, env=env(), cwd=tmp_path, timeout=30)
        assert out.returncode == 0, out.stderr
        rows = {p["name"]: p for p in json.loads(out.stdout)["processes"]}
        assert {"name", "pid", "capability", "state", "restarts"} <= rows["worker-python-0"].keys()
        assert rows["worker-python-0"]["restarts"] >= 1
        assert rows["worker-python-0"]["capability"] == "python"
        pids = [p["pid"] for p in rows.values()]
    finally:
        if fleet.poll() is None:
            fleet.send_signal(signal.SIGTERM)
        code = fleet.wait(timeout=30)
    assert code == 0
    final = read_state(state_file)
    assert all(p["state"] == "stopped" for p in final["processes"]), final
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_a_plugin_that_crashes_on_import_is_given_up(tmp_path: Path, redis_server: RedisServer) -> None:
    path = manifest(tmp_path, redis_server.url, [
        {"capability": "crashy", "plugin": "tests.fleet.crashy:Worker", "replicas": 1},
        {"capability": "python", "replicas": 1}], maxQuickRestarts=2)
    m = load_manifest(path, environ=env(), plugins=False, services=False)  # past the check that would refuse it
    lines: list[tuple[str, str]] = []
    ring, _ = ensure_keyring(m, tmp_path / "keys")  # what fleet up does before it starts the supervisor
    supervisor = Supervisor(m, state_file=tmp_path / "state.json", environ=env(),
                            sink=lambda name, line: lines.append((name, line)),
                            keys=hand_out(m, ring, tmp_path / "shares"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(supervisor.run)
        with anyio.fail_after(40):
            while (crashy := next(p for p in supervisor.processes if p.spec.name == "worker-crashy-0")).state \
                    != "failed":
                await anyio.sleep(0.1)
        python = next(p for p in supervisor.processes if p.spec.name == "worker-python-0")
        assert python.state == "running"  # the other capabilities keep working
        supervisor.stop()
    assert crashy.restarts == 2
    assert "broken on purpose" in crashy.last_error
    assert any(name == "fleet" and "worker-crashy-0" in line and "giving up" in line for name, line in lines)
    assert any(name == "worker-crashy-0" for name, _ in lines)  # its output streamed with its prefix
    state = {p["name"]: p for p in read_state(tmp_path / "state.json")["processes"]}
    assert state["worker-crashy-0"]["state"] == "failed"
    assert state["worker-python-0"]["state"] == "stopped"
    assert supervisor.exit_code == 1
