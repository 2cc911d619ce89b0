"""``orchestrator watch`` in a real terminal (tmux): the live table while a run goes on, the summary at the end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import uuid

import anyio
import pytest

from tests.integration.harness import ROOT, Cluster

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(90)]


def tmux(socket: str, *args: str) -> str:
    return subprocess.run(["tmux", "-L", socket, *args], capture_output=True, text=True, timeout=10,
                          check=False).stdout


async def test_watch_draws_the_run_live_and_ends_with_a_summary(cluster: Cluster) -> None:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install tmux)")
    cluster.manager()
    cluster.spawn("python-worker", ["worker", "--redis", cluster.url, "--capability", "python",
                                     "--config", json.dumps({"timeout_s": 60})])
    run_id = await cluster.submit(cluster.write_job("watched", [
        {"id": "slow", "capability": "python", "instruction": "import time\ntime.sleep(4)\nresult = 'slept'",
         "timeout_s": 60},
        {"id": "after", "capability": "python", "depends_on": ["slow"], "instruction": "result = deps['slow'] + '!'"},
    ]))
    socket = f"orch-test-{uuid.uuid4().hex[:8]}"
    env = f"PYTHONPATH={ROOT} ORCH_REDIS_URL={cluster.url}"
    command = f"cd {ROOT} && env {env} {sys.executable} -m orchestrator.cli watch {run_id}; sleep 30"
    tmux(socket, "new-session", "-d", "-s", "watch", "-x", "140", "-y", "30", command)
    try:
        live = ""
        with anyio.fail_after(20):
            while "slow" not in live or "not_done" not in live:
                await anyio.sleep(0.3)
                live = tmux(socket, "capture-pane", "-p", "-t", "watch")
        print("live screen:\n" + live)
        assert "└ after" in live
        final = ""
        with anyio.fail_after(30):
            while "run accepted" not in final:
                await anyio.sleep(0.3)
                final = tmux(socket, "capture-pane", "-p", "-t", "watch")
        print("final screen:\n" + final)
        assert "slept!" in final
    finally:
        tmux(socket, "kill-server")
