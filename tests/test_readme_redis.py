"""The README's "On Redis" commands run as written, keys included, in a fresh directory with no keyring."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests._redis import RedisServer, redis_server_path
from tests._trust import env_without_orch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.redis, pytest.mark.skipif(redis_server_path() is None, reason="redis-server not found")]


def _redis_block() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"## On Redis, across processes and machines\n\n```bash\n(.*?)```", text, re.S)
    assert match, "README has no 'On Redis' bash block"
    return match.group(1)


def test_the_readme_redis_flow_runs_as_written(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    try:
        block = _redis_block()
        assert "orchestrator keys init" in block
        # Only the server differs: the README's URL is the machine's shared Redis.
        script = re.sub(r"redis://127\.0\.0\.1:6379/0", redis.url, block)
        (tmp_path / "examples").symlink_to(ROOT / "examples")
        env = env_without_orch(keep_keyring=False)  # no keyring from the tests
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"] = str(ROOT)
        # The block starts the manager and a worker in the background; stop them when it ends.
        wrapped = f"set -e\ntrap 'kill $(jobs -p) 2>/dev/null' EXIT\n{script}"
        done = subprocess.run(["bash", "-c", wrapped], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "accepted" in done.stdout, done.stdout
        assert (tmp_path / ".orchestrator" / "keys" / "worker.python.key").exists()
    finally:
        redis.stop()
