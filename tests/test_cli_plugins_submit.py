"""``plugins --json`` and ``submit "a goal"``, through the real command line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests._trust import env_without_orch

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def base_env(*paths: Path) -> dict[str, str]:
    env = env_without_orch(keep_keyring=False)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, paths), str(ROOT), env.get("PYTHONPATH", "")])
    return env


def install_plugins(site: Path) -> None:
    """Two plugins installed the way pip leaves them (a module and a .dist-info with entry points): one
    that works, one whose module is missing."""
    (site / "loud_plugin.py").write_text(
        'from workers import Task, Worker\n\n\nclass LoudWorker(Worker):\n    """Shouts its input.\n\n'
        '    More text that is not the summary.\n    """\n\n    capability = "loud"\n\n'
        '    async def handle(self, task: Task) -> str:\n        return str(task.input).upper()\n')
    for dist, entry in (("loud_plugin", "loud = loud_plugin:LoudWorker"),
                        ("broken_plugin", "broken = no_such_module_here:Worker")):
        info = site / f"{dist}-1.2.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
        (info / "entry_points.txt").write_text(f"[orchestrator.workers]\n{entry}\n")


def test_plugins_json_lists_every_plugin_with_stable_keys(tmp_path: Path) -> None:
    install_plugins(tmp_path)
    proc = cli("plugins", "--json", env=base_env(tmp_path))
    assert proc.returncode == 0, proc.stderr
    rows = {row["name"]: row for row in json.loads(proc.stdout)}
    keys = {"name", "capability", "target", "package", "version", "description", "needs_llm", "error"}
    assert all(set(row) == keys for row in rows.values())
    assert rows["loud"] == {"name": "loud", "capability": "loud", "target": "loud_plugin:LoudWorker",
                            "package": "loud_plugin", "version": "1.2.3", "description": "Shouts its input.",
                            "needs_llm": False, "error": None}
    assert rows["broken"]["capability"] is None
    assert "no_such_module_here" in rows["broken"]["error"]
    assert rows["llm"]["needs_llm"] is True
    assert rows["python"]["needs_llm"] is False
    assert rows["python"]["package"] == "orchestrator"
    plain = cli("plugins", env=base_env(tmp_path))  # the table still lists the broken one, without importing
    assert plain.returncode == 0
    assert "broken" in plain.stdout


@pytest.mark.redis
def test_submit_a_goal_plans_it_with_the_llm(redis_url: str) -> None:
    env = {**base_env(), "ORCH_REDIS_URL": redis_url, "ORCH_NAMESPACE": f"t{uuid.uuid4().hex[:10]}",
           "ORCH_KEYS": os.environ["ORCH_KEYS"], "ORCH_OPERATOR": "tests"}  # the session keyring's operator
    goal = "write a short market brief on heat pumps"
    proc = cli("submit", goal, "--json", env=env)  # no manager: the run is queued, its plan visible
    assert proc.returncode == 0, proc.stderr
    assert "cannot read job file" not in proc.stderr
    assert "planned by the built-in vLLM simulator" in proc.stderr  # no --llm-url: said, as `run` says it
    run_id = json.loads(proc.stdout)["run_id"]
    status = cli("status", run_id, "--json", env=env)
    assert status.returncode == 3, status.stderr  # queued
    data = json.loads(status.stdout)
    assert data["goal"] == goal
    assert data["tasks"]
    assert {t["capability"] for t in data["tasks"]} == {"llm"}


@pytest.mark.redis
def test_submit_a_goal_without_an_operator_key_plans_nothing(redis_url: str, tmp_path: Path) -> None:
    env = {**base_env(), "ORCH_REDIS_URL": redis_url, "ORCH_KEYS": str(tmp_path / "no-keyring")}
    proc = cli("submit", "write a short market brief on heat pumps", env=env)
    assert proc.returncode == 2
    assert "no operator key" in proc.stderr
    assert "planned by the built-in vLLM simulator" not in proc.stderr  # refused before any planning


@pytest.mark.redis
def test_submit_a_missing_job_file_still_says_so(redis_url: str) -> None:
    env = {**base_env(), "ORCH_REDIS_URL": redis_url}
    proc = cli("submit", "jobs/no-such-job.yaml", env=env)
    assert proc.returncode == 2
    assert "no-such-job.yaml" in proc.stderr
