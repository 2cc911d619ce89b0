"""``orchestrator run`` as a user runs it: a real subprocess, exit codes and the --json contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(60)


def cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60, env=_env())


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_quickstart_is_accepted_with_a_redo_and_prints_a_summary() -> None:
    proc = cli("run", "examples/quickstart.yaml")
    assert proc.returncode == 0, proc.stderr
    assert "run accepted" in proc.stdout
    assert "1 redo(s)" in proc.stdout


def test_json_output_has_the_contract_keys() -> None:
    proc = cli("run", "examples/quickstart.yaml", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert {"run_id", "state", "tasks"} <= data.keys()
    assert data["state"] == "accepted"
    tasks = {t["id"]: t for t in data["tasks"]}
    assert list(tasks) == ["primes", "stats", "headline"]
    for task in tasks.values():
        assert {"id", "capability", "state", "attempts", "output"} <= task.keys()
    assert tasks["stats"]["output"] == {"count": 25, "sum": 1060, "largest": 97}
    assert tasks["headline"]["attempts"] == 2


def test_failed_run_exits_1(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("goal: fail\ntasks:\n  - id: t\n    capability: python\n    instruction: result = 1\n"
                   "    max_attempts: 1\n    spec: {expect: 2}\n")
    proc = cli("run", str(job), "--json")
    assert proc.returncode == 1
    data = json.loads(proc.stdout)
    assert data["state"] == "failed"
    assert "expected 2, got 1" in data["tasks"][0]["reason"]


@pytest.mark.parametrize(("body", "message"), [
    ("goal: g\ntasks:\n  - id: a\n    capability: nope\n", "task 'a': field 'capability': unknown capability 'nope'"),
    ("goal: g\ntasks:\n  - id: a\n    capability: python\n    depends_on: [b]\n",
     "task 'a': field 'depends_on': depends on unknown task 'b'"),
    ("goal: g\ntasks:\n  - {id: a, capability: python, depends_on: [b]}\n  - {id: b, capability: python, "
     "depends_on: [a]}\n", "dependency cycle a -> b -> a"),
    ("goal: g\ntasks:\n  - id: a\n    capability: python\n    max_attempts: many\n",
     "task 'a': field 'max_attempts': Input should be a valid integer"),
    ("goal: g\ntasks:\n  - id: a\n", "task 'a': field 'capability': is required"),
    ("goal: [unclosed\n", "not valid YAML"),
])
def test_invalid_job_exits_2_naming_file_task_and_field(tmp_path: Path, body: str, message: str) -> None:
    job = tmp_path / "bad.yaml"
    job.write_text(body)
    proc = cli("run", str(job))
    assert proc.returncode == 2
    assert str(job) in proc.stderr
    assert message in proc.stderr


def test_missing_job_file_and_bad_usage_exit_2() -> None:
    assert cli("run", "no/such/job.yaml").returncode == 2
    assert cli("frobnicate").returncode == 2
    proc = cli("run", "examples/quickstart.yaml", "--worker", "no_such_module:Worker")
    assert proc.returncode == 2
    assert "no_such_module:Worker" in proc.stderr


def test_a_goal_is_planned_and_run_on_the_simulator_which_says_so() -> None:
    proc = cli("run", "write a short market brief on heat pumps", "--json")
    assert proc.returncode == 0, proc.stderr
    assert "using the built-in vLLM simulator. Its answers are simulated." in proc.stderr
    data = json.loads(proc.stdout)
    assert data["state"] == "accepted"
    assert len(data["tasks"]) >= 3
    assert any(t["attempts"] >= 2 for t in data["tasks"]), "at least one redo"
    assert all(t["tokens"] > 0 for t in data["tasks"])


def test_an_unreachable_llm_server_fails_at_start_with_a_clear_message() -> None:
    proc = cli("run", "a goal", "--llm-url", "http://127.0.0.1:9/v1")
    assert proc.returncode == 1
    assert "cannot reach the LLM server at 'http://127.0.0.1:9'" in proc.stderr
