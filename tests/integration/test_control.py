"""A person's overrides from a separate process against a running manager and worker (real Redis).

approve, reject with feedback, cancel and force-redo are run as ``orchestrator`` subprocesses, the way
an operator would; the history (``orchestrator events --json``) and the final states are checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import anyio
import pytest

from tests.integration.harness import ROOT, Cluster

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(90)]

TASKS: list[dict[str, Any]] = [
    {"id": "approve_me", "capability": "python", "instruction": "result = 'draft'", "spec": {"approval": "human"}},
    {"id": "reject_me", "capability": "python", "spec": {"approval": "human"},
     "instruction": "result = 'revised: ' + feedback[-1] if feedback else 'first try'"},
    {"id": "cancel_me", "capability": "python", "instruction": "import time\ntime.sleep(60)\nresult = 1",
     "timeout_s": 90, "config": {}},
    {"id": "redo_me", "capability": "python", "timeout_s": 90,
     "instruction": "import time\nif not feedback:\n    time.sleep(60)\nresult = 'redone: ' + ' '.join(feedback)"},
]


def cli(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ORCH_REDIS_URL": cluster.url}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60, check=False)


async def until_state(cluster: Cluster, run_id: str, task_id: str, state: str, attempts: int = 1) -> None:
    with anyio.fail_after(30):
        while True:
            status = await cluster.status(run_id)  # None until the manager has picked the job up
            task = next((t for t in status["tasks"] if t["id"] == task_id), None) if status else None
            if task is not None and task["state"] == state and task["attempts"] >= attempts:
                return
            await anyio.sleep(0.2)


async def test_approve_reject_cancel_and_redo_from_another_process(cluster: Cluster) -> None:
    cluster.manager()
    cluster.spawn("python-worker", ["worker", "--redis", cluster.url, "--capability", "python", "--concurrency", "8",
                                     "--lease-s", "5", "--config", json.dumps({"timeout_s": 90})])
    run_id = await cluster.submit(cluster.write_job("control", TASKS))

    await until_state(cluster, run_id, "approve_me", "verify_done")
    await until_state(cluster, run_id, "reject_me", "verify_done")
    await until_state(cluster, run_id, "cancel_me", "not_done")
    await until_state(cluster, run_id, "redo_me", "not_done")

    early = cli(cluster, "approve", run_id, "cancel_me", "--by", "ops@example")
    assert early.returncode == 2
    assert "cannot approve task 'cancel_me'" in early.stderr

    assert cli(cluster, "approve", run_id, "approve_me", "--as", "alice").returncode == 0
    assert cli(cluster, "reject", run_id, "reject_me", "--feedback", "cite the source", "--as", "bob").returncode == 0
    assert cli(cluster, "cancel", run_id, "cancel_me", "--feedback", "not needed", "--as", "carol").returncode == 0
    assert cli(cluster, "redo", run_id, "redo_me", "--feedback", "use the outline", "--as", "dave").returncode == 0

    await until_state(cluster, run_id, "reject_me", "verify_done", attempts=2)
    assert cli(cluster, "approve", run_id, "reject_me", "--as", "bob").returncode == 0
    status = await cluster.wait(run_id, timeout=40)

    tasks = {t["id"]: t for t in status["tasks"]}
    assert tasks["approve_me"]["state"] == "accepted"
    assert tasks["reject_me"]["state"] == "accepted"
    assert tasks["reject_me"]["output"] == "revised: cite the source"  # the worker saw the feedback
    assert tasks["cancel_me"]["state"] == "cancelled"
    assert tasks["cancel_me"]["reason"] == "not needed"
    assert tasks["redo_me"]["state"] == "accepted"
    assert tasks["redo_me"]["output"] == "redone: use the outline"
    assert status["state"] == "cancelled"  # a person cancelled part of it

    proc = cli(cluster, "events", run_id, "--json")
    assert proc.returncode == 0, proc.stderr
    events = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    overrides = {(e["task_id"], e["body"]["action"], e["actor"]) for e in events if e["body"]["kind"] == "override"}
    # Each decision is recorded under the operator key that signed it.
    assert {("approve_me", "approve", "operator:alice"), ("reject_me", "reject", "operator:bob"),
            ("redo_me", "redo", "operator:dave"), ("reject_me", "approve", "operator:bob")} <= overrides
    rejected = next(e["body"]["verdict"] for e in events if e["task_id"] == "reject_me"
                    and e["body"].get("event") == "reject")  # a deciding verdict rides on its transition
    assert (rejected["feedback"], rejected["verifier"]) == ("cite the source", "person:operator:bob")
    cancel = next(e for e in events if e["task_id"] == "cancel_me" and e["body"].get("event") == "cancel")
    assert cancel["actor"] == "operator:carol"

    text = cli(cluster, "events", run_id)
    assert "approve_me#1" in text.stdout
    assert "by operator:alice" in text.stdout
