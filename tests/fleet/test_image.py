"""deploy/Dockerfile: what it copies exists and builds, and it agrees with the rendered manifests.

No Docker daemon runs on the test machines, so the image itself is not built here; these checks
cover what breaks most often: a file missing from the build context, a plugin that does not
package, and a user id the pods do not expect.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from orchestrator.fleet.render import POD_SECURITY

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"


def copied() -> list[str]:
    """The sources of every COPY, relative to the build context (the repository root)."""
    sources: list[str] = []
    for line in DOCKERFILE.read_text().splitlines():
        if line.startswith("COPY "):
            *srcs, _dest = line.split()[1:]
            sources += srcs
    return sources


def test_every_copied_path_exists_and_is_not_docker_ignored() -> None:
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert copied()
    for source in copied():
        assert (ROOT / source).exists(), f"deploy/Dockerfile copies {source!r}, which does not exist"
        assert source.rstrip("/") not in ignored


def test_the_image_runs_as_the_user_the_pods_expect() -> None:
    text = DOCKERFILE.read_text()
    uid = re.search(r"useradd --uid (\d+)", text)
    user = re.search(r"^USER (\d+)$", text, re.MULTILINE)
    assert uid is not None
    assert user is not None
    assert int(uid.group(1)) == int(user.group(1)) == POD_SECURITY["runAsUser"] == POD_SECURITY["fsGroup"]


def test_the_fleet_example_names_the_image_the_dockerfile_builds() -> None:
    spec = yaml.safe_load((ROOT / "deploy" / "fleet.yaml").read_text())["spec"]
    assert f"-t {spec['image']} ." in DOCKERFILE.read_text()


@pytest.mark.slow
def test_the_copied_files_alone_build_orchestrator_and_the_plugin(tmp_path: Path) -> None:
    context = tmp_path / "context"
    for source in copied():
        src, dest = ROOT / source, context / source
        if src.is_dir():
            shutil.copytree(src, dest, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
    wheels = tmp_path / "wheels"
    # The image's `pip install` step, minus dependencies and build isolation (no network in tests).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), ".", "./examples/slugify-plugin"], cwd=context, check=True, timeout=180)
    [core] = wheels.glob("orchestrator-*.whl")
    [plugin] = wheels.glob("orchestrator_slugify-*.whl")
    names = set(zipfile.ZipFile(core).namelist())
    assert {"orchestrator/cli.py", "protocol/bus.py", "workers/base.py"} <= names
    entry_points = next(n for n in zipfile.ZipFile(plugin).namelist() if n.endswith("entry_points.txt"))
    assert "slugify" in zipfile.ZipFile(plugin).read(entry_points).decode()
