"""``fleet up`` refuses, before starting anything, a process it could not start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator.fleet.commands import ProcessSpec, process_specs
from orchestrator.fleet.manifest import parse_manifest
from orchestrator.fleet.preflight import check_processes
from protocol.errors import ManifestError
from tests._redis import RedisServer
from tests._trust import env_without_orch

ROOT = Path(__file__).resolve().parents[2]


def manifest_data(**llm: object) -> dict[str, object]:
    return {"apiVersion": "orchestrator.dev/v1", "kind": "Fleet", "metadata": {"name": "pre"},
            "spec": {"llm": llm, "workers": [{"capability": "python", "replicas": 1}]}}


def test_a_missing_llm_binary_names_the_process_and_the_field() -> None:
    m = parse_manifest(manifest_data(serve={"model": "m", "command": ["no-such-vllm-binary"]}), environ={})
    with pytest.raises(ManifestError) as caught:
        check_processes(m, process_specs(m, environ={"PATH": os.environ["PATH"]}), source="f.yaml")
    text = str(caught.value)
    assert text.startswith("f.yaml: spec.llm.serve.command: process 'vllm' cannot start: executable "
                           "'no-such-vllm-binary' is not found on PATH")
    assert "nothing was started" in text


def test_the_path_the_process_gets_is_the_one_searched(tmp_path: Path) -> None:
    binary = tmp_path / "fake-vllm"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    m = parse_manifest(manifest_data(serve={"model": "m", "command": ["fake-vllm"]}), environ={})
    check_processes(m, process_specs(m, environ={"PATH": str(tmp_path)}))  # found there
    with pytest.raises(ManifestError, match="'fake-vllm' is not found"):
        check_processes(m, process_specs(m, environ={"PATH": "/nonexistent"}))


def test_orchestrator_as_the_llm_command_runs_this_installations_simulator() -> None:
    m = parse_manifest(manifest_data(serve={"model": "sim-model", "command": ["orchestrator", "sim-llm"],
                                            "gpus": 0}), environ={})
    specs = process_specs(m, environ={"PATH": "/nonexistent"})  # `orchestrator` need not be on PATH
    llm = next(s for s in specs if s.role == "llm")
    assert llm.argv[:5] == (sys.executable, "-m", "orchestrator.cli", "sim-llm", "serve")
    check_processes(m, specs)


def test_a_verb_this_installation_lacks_is_named() -> None:
    m = parse_manifest(manifest_data(), environ={})
    spec = ProcessSpec("ui", "ui", (sys.executable, "-m", "orchestrator.cli", "--log-level", "INFO", "no-such-verb"))
    with pytest.raises(ManifestError, match=r"spec.ui: process 'ui' cannot start: .*invalid choice: 'no-such-verb'"):
        check_processes(m, [spec])



@pytest.mark.redis
def test_fleet_up_exits_2_before_starting_anything(tmp_path: Path, redis_server: RedisServer) -> None:
    data = manifest_data(serve={"model": "m", "command": ["no-such-vllm-binary"]})
    data["spec"]["redis"] = {"url": redis_server.url}  # type: ignore[index]
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    env = env_without_orch(keep_keyring=False)
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "fleet", "up", str(path)], cwd=tmp_path,
                          env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "process 'vllm' cannot start: executable 'no-such-vllm-binary' is not found on PATH" in proc.stderr
    assert "started" not in proc.stdout  # no "[fleet] started ..." line: nothing ran
    assert not (tmp_path / ".orchestrator" / "fleet-pre.json").exists()


@pytest.mark.redis
def test_a_console_without_its_dependencies_is_refused_before_anything_starts(tmp_path: Path,
                                                                              redis_server: RedisServer) -> None:
    blocked = tmp_path / "blocked"
    (blocked / "starlette").mkdir(parents=True)  # shadows the installed one, as if it were not installed
    (blocked / "starlette" / "__init__.py").write_text("raise ModuleNotFoundError('No module named starlette', "
                                                       "name='starlette')\n")
    data = manifest_data()
    data["spec"].update({"redis": {"url": redis_server.url}, "ui": {"port": 18099}})  # type: ignore[attr-defined]
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    env = env_without_orch(keep_keyring=False)
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "fleet", "up", str(path)], cwd=tmp_path,
                          env={**env, "PYTHONPATH": f"{blocked}{os.pathsep}{ROOT}"}, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert ("spec.ui: process 'ui' cannot start: the web console needs starlette and uvicorn (starlette is "
            "missing): pip install 'orchestrator[ui]'") in proc.stderr
    assert not (tmp_path / ".orchestrator").exists()  # no state, no keys: nothing was started or made
