"""The in-process benchmarks (benchmarks/embedded.py, benchmarks/engine.py), run small, so that a change to the
API they drive shows here, not in someone's measurement."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_embedded_benchmark_prints_both_rows_and_their_ratio() -> None:
    done = subprocess.run([sys.executable, "benchmarks/embedded.py", "--tasks", "200", "--latency-tasks", "20",
                           "--repeats", "1"], cwd=ROOT, capture_output=True, text=True, timeout=240,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {row[0]: row[1:] for row in (line.split() for line in done.stdout.splitlines()) if len(row) == 4}
    for name in ("plain", "embedded", "embedded/plain"):
        assert name in rows, done.stdout
        assert all(float(cell) > 0 for cell in rows[name]), done.stdout
    assert re.search(r"CPU a task of the job, medians: plain \d+  embedded \d+ us", done.stdout), done.stdout


def test_the_engine_benchmark_accepts_every_task_and_prints_both_costs() -> None:
    done = subprocess.run([sys.executable, "benchmarks/engine.py", "--tasks", "50", "--repeats", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout
    found = re.search(r"start ([\d.]+) us a task, reply ([\d.]+) us a task", done.stdout)
    assert found, done.stdout
    assert float(found[1]) > 0
    assert float(found[2]) > 0
