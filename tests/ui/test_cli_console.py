"""``orchestrator ui`` and ``run --ui`` as a user starts them: real subprocesses, exit codes, login URLs."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import httpx
import pytest
import yaml

pytest.importorskip("starlette", reason="the console needs starlette: pip install 'orchestrator[ui]'")

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60, check=False)


def test_bad_console_flags_exit_2_naming_them() -> None:
    bad_port = cli("ui", "--port", "70000")
    assert (bad_port.returncode, "--port must be a port number" in bad_port.stderr) == (2, True), bad_port.stderr
    bad_name = cli("ui", "--port", "0", "--operator", "a b")
    assert (bad_name.returncode, "operator name 'a b'" in bad_name.stderr) == (2, True), bad_name.stderr
    bad_ui_port = cli("run", "examples/quickstart.yaml", "--ui", "--ui-port", "-1")
    assert (bad_ui_port.returncode, "--ui-port must be" in bad_ui_port.stderr) == (2, True), bad_ui_port.stderr


@pytest.mark.redis
def test_a_taken_port_exits_2_naming_it(redis_url: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("ui", "--redis", redis_url, "--namespace", "ui-port-test", "--port", str(port))
    assert result.returncode == 2, result.stderr
    assert f"cannot serve the console on 127.0.0.1:{port}" in result.stderr


@pytest.mark.redis
def test_an_operator_without_a_key_in_the_keyring_exits_2_naming_it(redis_url: str) -> None:
    result = cli("ui", "--redis", redis_url, "--namespace", "ui-key-test", "--port", "0", "--operator", "mallory")
    assert result.returncode == 2, result.stderr
    assert "no private key for operator:mallory" in result.stderr
    assert "orchestrator keys add operator mallory" in result.stderr


@pytest.mark.slow
async def test_run_with_ui_is_approved_over_http_and_exits_0(tmp_path: Path) -> None:
    job = tmp_path / "gated.yaml"
    job.write_text(yaml.safe_dump({"goal": "gated in process", "tasks": [
        {"id": "gated", "capability": "python", "instruction": "result = 'ok'", "spec": {"approval": "human"}}]}))
    err = tmp_path / "stderr.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with err.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", str(job), "--worker", "python",
                                 "--ui", "--ui-port", "0", "--json"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=sink, stdin=subprocess.DEVNULL)
    try:
        with anyio.fail_after(30):
            while not (found := re.search(r"in the console: (http://[^/\s]+)/#/run/(\w+)", err.read_text())):
                assert proc.poll() is None, err.read_text()
                await anyio.sleep(0.1)
        base, run_id = found.groups()
        login = re.search(r"log in as (operator:\S+): (http://\S+)", err.read_text())
        assert login is not None, err.read_text()
        async with httpx.AsyncClient(base_url=base) as http:
            with anyio.fail_after(20):
                # A 404 at first is a run whose first summary is on its way.
                while "approve" not in ((await http.get(f"/api/runs/{run_id}")).json().get("run") or
                                        {"tasks": [{"actions": []}]})["tasks"][0]["actions"]:
                    await anyio.sleep(0.1)
            assert (await http.get(login.group(2).removeprefix(base))).status_code == 303
            csrf = (await http.get("/api/me")).json()["csrf"]
            sent = await http.post(f"/api/runs/{run_id}/actions", json={"action": "approve", "task_id": "gated"},
                                   headers={"X-CSRF-Token": csrf})
            assert sent.status_code == 202, sent.text
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert proc.returncode == 0, err.read_text()
    assert '"state": "accepted"' in out.decode()


@pytest.mark.redis
async def test_sigterm_ends_open_event_streams_cleanly_and_exits_0(redis_url: str, tmp_path: Path) -> None:
    from tests._redis import free_port

    port = free_port()
    err = tmp_path / "stderr.txt"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with err.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "ui", "--redis", redis_url, "--namespace",
                                 "ui-sigterm", "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                stderr=sink, stdin=subprocess.DEVNULL)
    try:
        with anyio.fail_after(20):
            while "console at" not in err.read_text():
                assert proc.poll() is None, err.read_text()
                await anyio.sleep(0.1)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as http, \
                http.stream("GET", "/api/runs/not-started-yet/stream") as stream:
            lines = stream.aiter_lines()
            assert await anext(lines) == "retry: 2000"
            proc.send_signal(signal.SIGTERM)
            rest = [line async for line in lines]  # the server ends the response: no error, no hang
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert rest == ["", ": keep-alive", ""] or rest == [""], rest
    assert "Traceback" not in err.read_text()
