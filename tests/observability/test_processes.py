"""``orchestrator manager --metrics-port`` and ``orchestrator worker --metrics-port`` as real processes on Redis."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests._redis import free_port

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families

pytestmark = [pytest.mark.redis, pytest.mark.timeout(90)]

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator.cli", *args]


def scrape(port: int, deadline_s: float = 20.0) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    deadline = time.monotonic() + deadline_s
    while True:
        try:
            resp = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2.0)
            break
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert resp.status_code == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(resp.text) for s in family.samples}


def test_manager_and_worker_serve_metrics_of_a_real_run(redis_url: str, tmp_path: Path) -> None:
    namespace = f"t{uuid.uuid4().hex[:10]}"
    common = ("--redis", redis_url, "--namespace", namespace, "--lease-s", "5")
    manager_port, worker_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("ORCH_TRACING", None)
    logs = [(tmp_path / "manager.log").open("wb"), (tmp_path / "worker.log").open("wb")]
    procs = [
        subprocess.Popen(cli("manager", *common, "--ledger", str(tmp_path / "ledger.db"), "--metrics-port",
                             str(manager_port), "--metrics-host", "127.0.0.1"), cwd=ROOT, env=env,
                         stderr=logs[0]),
        subprocess.Popen(cli("worker", *common, "--capability", "python", "--metrics-port", str(worker_port),
                             "--metrics-host", "127.0.0.1"), cwd=ROOT, env=env, stderr=logs[1]),
    ]
    try:
        before = scrape(manager_port)
        assert ("orchestrator_runs", frozenset({("state", "running")})) not in before  # no run yet
        scrape(worker_port)
        done = subprocess.run(cli("submit", *common, "examples/quickstart.yaml", "--wait", "--json"), cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        run = json.loads(done.stdout)
        history = subprocess.run(cli("events", *common, run["run_id"], "--json"), cwd=ROOT, env=env,
                                 capture_output=True, text=True, timeout=30)
        assert history.returncode == 0, history.stderr
        events = [json.loads(line) for line in history.stdout.splitlines()]
        manager = scrape(manager_port)
        worker = scrape(worker_port)
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()
    transitions = Counter(e["body"]["event"] for e in events if e["body"]["kind"] == "transition")
    assert transitions["reject"] == 1  # the quickstart has one redo
    for name, count in transitions.items():
        got = sum(v for (n, labels), v in manager.items()
                  if n == "orchestrator_task_transitions_total" and ("event", name) in labels)
        assert got == count, name
    assert manager[("orchestrator_runs", frozenset({("state", "accepted")}))] == 1
    assert manager[("orchestrator_task_attempts_count", frozenset({("capability", "python")}))] == len(run["tasks"])
    handled = worker[("orchestrator_worker_tasks_handled_total",
                      frozenset({("capability", "python"), ("outcome", "done")}))]
    assert handled == sum(t["attempts"] for t in run["tasks"])
    # the ports are free again: the processes closed their endpoints
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{manager_port}/metrics", timeout=1.0)
