"""examples/quickstart.yaml ends accepted across a fleet whose LLM is sim-llm (the fleet's manager judges with it)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import anyio
import httpx
import pytest
import yaml

from orchestrator import processes
from orchestrator.fleet.manifest import load_manifest
from orchestrator.job import load_job
from tests._redis import RedisServer, free_port, redis_server_path
from tests._trust import env_without_orch, operator_trust
from tests.fleet.test_supervisor import wait_state

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(90),
              pytest.mark.skipif(redis_server_path() is None, reason="redis-server is not on PATH")]



async def test_quickstart_is_accepted_in_a_fleet_judged_by_sim_llm(tmp_path: Path, redis_server: RedisServer) -> None:
    env = env_without_orch(keep_keyring=True)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    env["ORCH_VLLM_BINARY"] = f"{sys.executable} -m orchestrator.simulator"  # sim-llm stands in for `vllm serve`
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({
        "apiVersion": "orchestrator.dev/v1", "kind": "Fleet", "metadata": {"name": "judged"},
        "spec": {"namespace": f"j{os.getpid()}", "leaseSeconds": 2, "redis": {"url": redis_server.url},
                 "llm": {"serve": {"model": "sim-model", "port": free_port(), "startupTimeoutSeconds": 30,
                                   "args": ["--time-scale", "0.01", "--dtype", "bfloat16", "--enforce-eager",
                                            "--sim-admin"]}},
                 "ledger": {"path": str(tmp_path / "ledger.db")}, "manager": {"leaseSeconds": 2},
                 "workers": [{"capability": "python", "plugin": "python", "replicas": 1}],
                 "supervisor": {"backoffSeconds": 0.2, "gracePeriodSeconds": 5}}}))
    state_file = tmp_path / "state.json"
    argv = [sys.executable, "-m", "orchestrator.cli", "fleet", "up", str(path), "--state-file", str(state_file),
            "--log-dir", str(tmp_path / "logs")]
    async with await anyio.open_process(argv, cwd=tmp_path, env=env, stdout=None, stderr=None) as fleet:
        try:
            await anyio.to_thread.run_sync(wait_state, state_file, lambda ps: len(ps) == 3 and all(
                p["state"] == "running" for p in ps.values()))
            await anyio.sleep(1.0)  # the manager takes the lead and the worker subscribes
            m = load_manifest(path, environ={}, plugins=False, services=False)
            async with processes.open_bus(redis_server.url, namespace=m.spec.namespace, lease_s=2,
                                      trust=operator_trust()) as bus:
                run_id = await processes.submit_job(bus, load_job(ROOT / "examples" / "quickstart.yaml"))
                with anyio.fail_after(45):
                    result = await processes.wait_for_run(bus, run_id)
            async with httpx.AsyncClient(base_url=m.llm_url or "") as http:
                sim_state = (await http.get("/_sim/state")).json()
        finally:
            if fleet.returncode is None:
                fleet.send_signal(signal.SIGTERM)
            with anyio.CancelScope(shield=True), anyio.fail_after(30):
                await fleet.wait()
    assert result["state"] == "accepted", result
    headline = next(t for t in result["tasks"] if t["id"] == "headline")
    assert headline["state"] == "accepted"
    assert sim_state["requests_by_endpoint"]["/v1/chat/completions"] >= 1  # the manager's judge asked sim-llm
    logs = "".join(p.read_text() for p in (tmp_path / "logs").iterdir())
    assert "sim_flags_ignored" in logs  # the served vLLM ignored --dtype/--enforce-eager, as sim-llm does
