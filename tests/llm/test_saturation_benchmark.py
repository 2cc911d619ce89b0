"""``benchmarks/llm_saturation.py --url``, run small against the simulator over real HTTP, so that the GPU check
(the same command against ``transformers serve`` or vLLM) is known to work before a GPU session spends time on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import anyio

from orchestrator.simulator import SimulatedVLLM

ROOT = Path(__file__).resolve().parents[2]


async def test_every_arm_sends_the_burst_and_is_compared_with_the_plain_load_generator(
        sim_llm: SimulatedVLLM, tmp_path: Path) -> None:
    out = tmp_path / "saturation.json"
    done = await anyio.run_process(
        [sys.executable, "benchmarks/llm_saturation.py", "--url", sim_llm.url, "--requests", "24",
         "--concurrency", "8", "--max-tokens", "8", "--repeats", "2", "--json", str(out)],
        cwd=ROOT, check=False, stdin=subprocess.DEVNULL)
    stdout = done.stdout.decode()
    assert done.returncode == 0, done.stderr.decode()[-3000:] + stdout
    report = json.loads(out.read_text())
    assert report["workload"]["model"] == sim_llm.model
    for arm in ("plain", "client", "job"):
        runs = report["runs"][arm]
        assert len(runs) == 2
        assert all(r["requests"] == 24 and 0 < r["completion_tokens"] <= 24 * 8 for r in runs), runs
        assert report["medians"][arm]["tokens_per_s"] > 0
    assert report["medians"]["client"]["ratio_to_plain"] > 0
    assert report["medians"]["job"]["ratio_to_plain"] > 0
    # each repeat runs the arms in a rotated order, so none always goes first against a cold server
    firsts = [line.split()[2] for line in stdout.splitlines() if line.startswith("repeat ")][::3]
    assert firsts == ["plain", "client"], stdout


def test_an_unknown_arm_is_named() -> None:
    done = subprocess.run([sys.executable, "benchmarks/llm_saturation.py", "--url", "http://127.0.0.1:9",
                           "--model", "m", "--arms", "plain,fast"], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode != 0
    assert "unknown arm(s) ['fast']" in done.stderr
