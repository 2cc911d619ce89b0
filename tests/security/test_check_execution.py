"""A job names a check; it cannot make the manager import and call whatever it likes.

The attack from the issue: ``spec: {check: "pty:spawn"}`` and an output of ``["sh", "-c", ...]`` ran a
shell in the manager; ``check: shutil:rmtree`` deleted a directory. Here the job is added to the jobs
stream with redis-py, around the CLI, signed with an operator's key (a malicious operator, or a stolen
key: signing says who sent a job, not that its checks are safe), and the attacker plays the worker too
with that capability's key: if the manager ever sent an assign, the attacker answers it with the payload.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis

from tests.integration.harness import ROOT, Cluster
from tests.security.attacker import add, assigns, signed, stream_key

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]

VICTIM = "c"  # a capability of the session keyring: the attacker holds its worker key


def _hostile_job(check: str) -> dict[str, object]:
    return {"goal": "own the manager", "tasks": [{"id": "x", "capability": VICTIM, "max_attempts": 1,
                                                  "spec": {"check": check}}]}


async def _play_worker_until_the_run_ends(cluster: Cluster, r: redis.Redis, run_id: str, output: object) -> dict[str, Any]:
    """Answer any assign of the run with the payload, until the run ends."""
    answered: set[str] = set()
    with anyio.fail_after(30):
        while True:
            for a in assigns(r, VICTIM):
                if a["run_id"] == run_id and a["msg_id"] not in answered:
                    answered.add(a["msg_id"])
                    add(r, f"results.{VICTIM}", signed({"type": "done", "output": output}, f"worker:{VICTIM}",
                                                       run_id=run_id, task_id=a["task_id"], attempt=a["attempt"]))
            status = await cluster.status(run_id)
            if status is not None and status["state"] != "running":
                return status
            await anyio.sleep(0.1)


async def test_a_check_naming_any_importable_function_runs_nothing_in_the_manager(
        cluster: Cluster, attacker: redis.Redis, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    victim = tmp_path / "victim-dir"
    victim.mkdir()
    (victim / "precious").write_text("keep me")
    manager = cluster.manager()
    attacks = {"pty:spawn": ["sh", "-c", f"touch {marker}"], "shutil:rmtree": str(victim),
               "os:system": f"touch {marker}", "subprocess:getoutput": f"touch {marker}"}
    for check, payload in attacks.items():
        run_id = uuid.uuid4().hex
        add(attacker, "jobs", signed({"type": "submit", "job": _hostile_job(check), "source": "x.yaml"},
                                     "operator:tests", run_id=run_id))
        status = await _play_worker_until_the_run_ends(cluster, attacker, run_id, payload)
        assert status["state"] == "failed", check
        assert f"check {check!r} is not registered" in status["reason"], status
        assert not [a for a in assigns(attacker, VICTIM) if a["run_id"] == run_id]  # never dispatched
    assert not marker.exists()
    assert (victim / "precious").read_text() == "keep me"
    assert manager.alive


@pytest.mark.parametrize("verb", ["submit", "run"])
def test_the_cli_refuses_such_a_job_with_exit_2_and_sends_nothing(cluster: Cluster, attacker: redis.Redis,
                                                                   tmp_path: Path, verb: str) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("goal: g\ntasks:\n  - {id: x, capability: python, instruction: 'result = 1', "
                   "spec: {check: 'pty:spawn'}}\n")
    args = [sys.executable, "-m", "orchestrator.cli", verb, str(job)]
    if verb == "submit":
        args += ["--redis", cluster.url]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2, proc.stderr
    assert f"{job}: task 'x': field 'spec.check': check 'pty:spawn' is not registered" in proc.stderr
    assert attacker.xlen(stream_key("jobs")) == 0
