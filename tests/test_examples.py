"""examples/: the example plugin installs as its own package and serves jobs through its entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "examples" / "slugify-plugin"
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pip-install the example plugin into a private directory, as a user would install it."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    "--no-build-isolation", "--target", str(target), str(PLUGIN)], check=True, timeout=110)
    return target


def run_cli(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(ROOT)]))
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def test_installed_plugin_is_listed_by_its_capability(installed_plugin: Path) -> None:
    proc = run_cli(installed_plugin, "plugins")
    assert proc.returncode == 0, proc.stderr
    assert "slugify" in proc.stdout
    assert "orchestrator_slugify:SlugifyWorker" in proc.stdout


def test_installed_plugin_runs_a_job_with_its_own_verify_and_its_registered_check(installed_plugin: Path) -> None:
    proc = run_cli(installed_plugin, "run", str(PLUGIN / "job.yaml"), "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert [t["output"] for t in data["tasks"]] == ["heat-pumps-a-buyer-s-guide", "creme-brulee-at-home"]
    assert all(t["state"] == "accepted" for t in data["tasks"])


def test_the_plugins_check_fails_an_output_that_is_not_a_slug_and_is_unknown_without_the_plugin(
        installed_plugin: Path, tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("goal: g\ntasks:\n  - {id: x, capability: python, instruction: \"result = 'Not A Slug'\", "
                   "max_attempts: 1, spec: {check: slugify.is_slug}}\n")
    proc = run_cli(installed_plugin, "run", str(job), "--json")
    assert proc.returncode == 1, proc.stderr
    [task] = json.loads(proc.stdout)["tasks"]
    assert "'Not A Slug' is not a slug" in task["reason"]
    without = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", str(job)], cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=60)
    assert without.returncode == 2
    assert "check 'slugify.is_slug' is not registered" in without.stderr
