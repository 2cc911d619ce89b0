"""The README's fleet commands, as written: a real `fleet up` of deploy/local.yaml, a run accepted, a clean stop.

What differs from a user's terminal, and why: Redis is a private redis-server on a free port,
reached through ``ORCH_REDIS_URL`` as the README's comment says (not ``redis-server --daemonize``
on 6379, which other tests share); the manifest's ports (the simulator's, the console's) are
moved to free ports in a copy, so parallel runs cannot collide; and the commands run in a
scratch directory holding the README's files at the same relative paths.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests._redis import RedisServer, free_port, redis_server_path
from tests._trust import env_without_orch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(180),
              pytest.mark.skipif(redis_server_path() is None, reason="redis-server is not on PATH")]


def fleet_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- example: fleet -->\n```bash\n(.*?)```", text, re.S)
    assert match, "README has no 'fleet' example"
    lines = [line.split("#")[0].strip() if line.lstrip().startswith("#") else line.split("  #")[0].strip()
             for line in match.group(1).splitlines()]
    return [line for line in lines if line]



def wait_all_running(path: Path, count: int, fleet: subprocess.Popen[str], timeout: float = 90.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    state: dict[str, Any] = {}
    while time.monotonic() < deadline:
        assert fleet.poll() is None, f"fleet up exited with {fleet.returncode}"
        if path.exists():
            try:
                state = json.loads(path.read_text())
            except ValueError:
                state = {}
            if len(state.get("processes", [])) == count and all(
                    p["state"] == "running" for p in state["processes"]):
                return state
        time.sleep(0.2)
    raise AssertionError(f"the fleet never ran every process: {json.dumps(state, indent=1)}")


def test_the_readme_fleet_flow_runs_as_written(tmp_path: Path, redis_server: RedisServer) -> None:
    install, activate, start_redis, up, submit, status = fleet_commands()
    assert install == ".venv/bin/pip install -q -e '.[ui]'"  # here: installed with .[test], which holds .[ui]
    assert activate == ". .venv/bin/activate"  # here: this interpreter's bin directory first on PATH
    assert start_redis.startswith("redis-server")  # here: the private server, through ORCH_REDIS_URL
    work = tmp_path / "work"
    manifest_rel = shlex.split(up)[-1]
    job_rel = shlex.split(submit)[2]
    data = yaml.safe_load((ROOT / manifest_rel).read_text())
    data["spec"]["llm"]["serve"]["port"] = free_port()
    data["spec"]["ui"]["port"] = free_port()
    (work / manifest_rel).parent.mkdir(parents=True)
    (work / manifest_rel).write_text(yaml.safe_dump(data, sort_keys=False))
    (work / job_rel).parent.mkdir(parents=True)
    shutil.copy(ROOT / job_rel, work / job_rel)
    env = env_without_orch(keep_keyring=False)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["ORCH_REDIS_URL"] = redis_server.url
    assert shutil.which("orchestrator", path=env["PATH"]), "orchestrator is not installed next to this python"

    log = (tmp_path / "fleet.out").open("w")  # a file, not a pipe nobody reads while the run goes on
    fleet = subprocess.Popen(shlex.split(up), cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        workers = sum(w["replicas"] for w in data["spec"]["workers"])
        expected = 1 + 1 + workers + 1  # the simulator, the manager, the workers, the console
        wait_all_running(work / ".orchestrator" / "fleet-local.json", expected, fleet)
        done = subprocess.run(shlex.split(submit), cwd=work, env=env, capture_output=True, text=True, timeout=90)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "accepted" in done.stdout
        shown = subprocess.run(shlex.split(status), cwd=work, env=env, capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        rows = json.loads(shown.stdout)["processes"]
        assert len(rows) == expected
        assert all(p["state"] == "running" and p["restarts"] == 0 for p in rows), rows
        pids = [p["pid"] for p in rows]
        assert_each_process_holds_only_its_key(work / ".orchestrator", rows, data)
        page = httpx.get(f"http://127.0.0.1:{data['spec']['ui']['port']}/", timeout=10)  # the console answers
        assert page.status_code == 200, page.text[:500]
        share = work / ".orchestrator" / "fleet-local-keys" / "manager" / "manager.key"
        before = share.stat().st_ino
        second = subprocess.run(shlex.split(up), cwd=work, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 1, second.stdout + second.stderr
        assert f"already running under supervisor pid {fleet.pid} (it holds" in second.stderr
        assert share.stat().st_ino == before  # the running fleet's keys were left alone
    finally:
        if fleet.poll() is None:
            fleet.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            fleet.wait(timeout=60)
        except subprocess.TimeoutExpired:
            fleet.kill()
            fleet.wait()
        log.close()
    out = (tmp_path / "fleet.out").read_text()
    assert fleet.returncode == 0, out[-4000:]
    assert "[fleet] stopped" in out
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def assert_each_process_holds_only_its_key(state_dir: Path, rows: list[dict[str, Any]], data: dict[str, Any]) -> None:
    """fleet up made the keyring where `orchestrator submit` looks, and gave each process only its role's key."""
    ring = {p.name for p in (state_dir / "keys").iterdir()}
    capabilities = [w["capability"] for w in data["spec"]["workers"]]
    assert {"keyring.json", "manager.key", "operator.admin.key", *(f"worker.{c}.key" for c in capabilities)} == ring
    expected = {"manager": "manager.key", **{f"worker-{c}": f"worker.{c}.key" for c in capabilities},
                "operator-admin": "operator.admin.key"}
    shares = state_dir / "fleet-local-keys"
    for share, key in expected.items():
        assert sorted(p.name for p in (shares / share).iterdir()) == sorted(["keyring.json", key]), share
        assert (shares / share / key).stat().st_mode & 0o077 == 0  # private: the owner alone
    for row in rows:
        keys = environ_of(row["pid"]).get("ORCH_KEYS")
        if row["role"] == "llm":
            assert keys is None  # the model server is not on the bus: no key at all
            continue
        share = {"manager": "manager", "worker": f"worker-{row['capability']}", "ui": "operator-admin"}[row["role"]]
        assert keys is not None
        assert Path(keys).resolve() == (shares / share).resolve(), row


def test_the_fleet_state_directory_is_ignored_by_git() -> None:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    proc = subprocess.run(["git", "check-ignore", "-q", ".orchestrator/fleet-local.json"], cwd=ROOT, timeout=30)
    assert proc.returncode == 0, ".orchestrator/ (fleet up's state, ledger and keys) must be in .gitignore"
