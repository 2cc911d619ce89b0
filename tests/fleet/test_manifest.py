"""The fleet manifest: strict validation, env overrides, startup checks and the command lines it builds."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.fleet.commands import manager_command, process_specs, vllm_command, worker_command
from orchestrator.fleet.manifest import load_manifest
from orchestrator.fleet.render import render_compose, render_kubernetes
from protocol.errors import ManifestError, ServiceUnreachable
from tests._redis import free_port

ROOT = Path(__file__).resolve().parents[2]


def base(**spec: Any) -> dict[str, Any]:
    return {"apiVersion": "orchestrator.dev/v1", "kind": "Fleet", "metadata": {"name": "t"},
            "spec": {"workers": [{"capability": "python", "plugin": "python", "replicas": 1}], **spec}}


def write(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def load(path: Path, **kw: Any) -> Any:
    kw.setdefault("services", False)
    return load_manifest(path, environ={}, **kw)


@pytest.mark.parametrize(("mutate", "field", "reason"), [
    (lambda d: d["spec"].update(bogus=1), "spec.bogus", "unknown field"),
    (lambda d: d["spec"]["workers"][0].update(color="red"), "spec.workers[0].color", "unknown field"),
    (lambda d: d["spec"]["workers"][0].update(replicas="many"), "spec.workers[0].replicas",
     "Input should be a valid integer"),
    (lambda d: d["spec"]["workers"].append({"capability": "llm", "replicas": -1}), "spec.workers[1].replicas",
     "Input should be greater than or equal to 0 (got -1)"),
    (lambda d: d["spec"].update(redis={"url": "http://x"}), "spec.redis.url", "must start with redis://"),
    (lambda d: d.update(kind="Deployment"), "kind", "Input should be 'Fleet'"),
    (lambda d: d["spec"].update(manager={"replicas": 2}), "spec.manager.replicas", "Input should be 1"),
    (lambda d: d.pop("metadata"), "metadata", "is required"),
])
def test_invalid_manifest_names_file_field_and_reason(tmp_path: Path, mutate: Any, field: str, reason: str) -> None:
    data = base()
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(ManifestError) as info:
        load(path, plugins=False)
    assert str(info.value).startswith(f"{path}: {field}: "), str(info.value)
    assert reason in str(info.value)
    assert info.value.field == field
    assert info.value.source == str(path)


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not valid YAML"):
        load(write(tmp_path, "spec: [unclosed\n"))
    with pytest.raises(ManifestError, match="cannot read"):
        load(tmp_path / "nope.yaml")


def test_unknown_plugin(tmp_path: Path) -> None:
    data = base()
    data["spec"]["workers"].append({"capability": "nope", "plugin": "nope"})
    path = write(tmp_path, data)
    with pytest.raises(ManifestError) as info:
        load(path)
    assert str(info.value).startswith(f"{path}: spec.workers[1].plugin: unknown plugin: no worker plugin named 'nope'")


def test_plugin_that_crashes_on_import_and_wrong_capability(tmp_path: Path) -> None:
    data = base()
    data["spec"]["workers"].append({"capability": "crashy", "plugin": "tests.fleet.crashy:Worker"})
    with pytest.raises(ManifestError, match=r"spec.workers\[1\].plugin: unknown plugin: .*broken on purpose"):
        load(write(tmp_path, data))
    data = base()
    data["spec"]["workers"][0]["plugin"] = "workers.builtin.llm:LLMWorker"
    with pytest.raises(ManifestError, match="serves capability 'llm', not 'python'"):
        load(write(tmp_path, data))


def test_unreachable_redis(tmp_path: Path) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    path = write(tmp_path, base(redis={"url": url}))
    with pytest.raises(ServiceUnreachable) as info:
        load_manifest(path, environ={})
    message = str(info.value)
    assert message.startswith(f"{path}: spec.redis.url: Redis at {url} does not answer PING"), message


@pytest.mark.redis
def test_unreachable_llm(tmp_path: Path, redis_url: str) -> None:
    llm = f"http://127.0.0.1:{free_port()}"
    path = write(tmp_path, base(redis={"url": redis_url}, llm={"url": llm}))
    with pytest.raises(ServiceUnreachable) as info:
        load_manifest(path, environ={})
    assert str(info.value).startswith(f"{path}: spec.llm.url: LLM server {llm}/health is unreachable"), info.value


class _OpenAIOnly(http.server.BaseHTTPRequestHandler):
    """An OpenAI-compatible server without vLLM's /health."""

    def do_GET(self) -> None:
        found = self.path == "/v1/models"
        body = b'{"object": "list", "data": [{"id": "small"}]}' if found else b'{"detail": "Not Found"}'
        self.send_response(200 if found else 404)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.redis
def test_an_llm_server_without_health_is_checked_by_its_model_list(tmp_path: Path, redis_url: str) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OpenAIOnly)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        llm = f"http://127.0.0.1:{server.server_address[1]}"
        path = write(tmp_path, base(redis={"url": redis_url}, llm={"url": llm}))
        assert load_manifest(path, environ={}).spec.llm.url == llm
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_llm_worker_without_llm_is_refused(tmp_path: Path) -> None:
    data = base()
    data["spec"]["workers"].append({"capability": "llm"})
    with pytest.raises(ManifestError, match=r"spec\.llm: capability 'llm' needs a language model"):
        load(write(tmp_path, data))


def test_env_overrides_the_manifest(tmp_path: Path) -> None:
    path = write(tmp_path, base(redis={"url": "redis://file:6379/0"}, llm={"url": "http://file:8000"},
                                ledger={"path": "file.db"}))
    env = {"ORCH_REDIS_URL": "redis://env:6379/1", "ORCH_LLM_URL": "http://env:9000/v1", "ORCH_LLM_MODEL": "m",
           "ORCH_LLM_API_KEY": "sk-env", "ORCH_LEDGER": "env.db", "ORCH_NAMESPACE": "envns"}
    m = load_manifest(path, environ=env, plugins=False, services=False)
    assert m.spec.redis.url == "redis://env:6379/1"
    assert m.llm_url == "http://env:9000/v1"
    assert m.llm_model == "m"
    assert m.api_key() == "sk-env"
    assert m.spec.ledger.path == "env.db"
    assert m.spec.namespace == "envns"
    assert "sk-env" not in m.to_yaml()


def test_workers_as_a_map_and_api_key_from_env(tmp_path: Path) -> None:
    data = base(llm={"url": "http://x", "apiKeyFromEnv": "MY_KEY"})
    data["spec"]["workers"] = {"python": {"replicas": 3}}
    m = load(write(tmp_path, data), plugins=False)
    assert m.spec.workers[0].capability == "python"
    assert m.spec.workers[0].replicas == 3
    assert m.api_key({"MY_KEY": "k"}) == "k"


def test_vllm_serve_command_line(tmp_path: Path) -> None:
    data = base(llm={"model": "served", "serve": {"model": "Qwen/Qwen2.5-7B-Instruct", "port": 8123, "gpus": 2,
                                                  "args": ["--max-model-len", 8192]}})
    m = load(write(tmp_path, data), plugins=False)
    assert m.spec.llm.serve is not None
    assert vllm_command(m.spec.llm.serve, served_model_name=m.llm_model) == [
        "vllm", "serve", "Qwen/Qwen2.5-7B-Instruct", "--host", "127.0.0.1", "--port", "8123",
        "--served-model-name", "served", "--tensor-parallel-size", "2", "--max-model-len", "8192"]
    assert m.llm_url == "http://127.0.0.1:8123"
    env = {"ORCH_VLLM_BINARY": f"{sys.executable} -m orchestrator.simulator"}
    m = load_manifest(write(tmp_path, data), environ=env, plugins=False, services=False)
    assert m.spec.llm.serve is not None
    assert vllm_command(m.spec.llm.serve)[:5] == [sys.executable, "-m", "orchestrator.simulator", "serve",
                                                  "Qwen/Qwen2.5-7B-Instruct"]


def test_manager_and_worker_command_lines(tmp_path: Path) -> None:
    data = base(llm={"url": "http://llm:8000", "model": "m", "apiKey": "sk-secret"}, leaseSeconds=2)
    data["spec"]["workers"][0].update(replicas=2, concurrency=3, config={"timeout_s": 5})
    m = load(write(tmp_path, data), plugins=False)
    cmd = worker_command(m, m.spec.workers[0], 1)
    assert cmd[:3] == [sys.executable, "-m", "orchestrator.cli"]
    joined = " ".join(cmd)
    for part in ("worker", "--capability python", "--plugin python", "--concurrency 3", '--config {"timeout_s":5}',
                 "--name t-python-1", "--lease-s 2", "--llm-url http://llm:8000", "--model m"):
        assert part in joined
    assert "manager" in manager_command(m)
    specs = process_specs(m, {})
    assert [s.name for s in specs] == ["manager", "worker-python-0", "worker-python-1"]
    assert all("sk-secret" not in " ".join(s.argv) for s in specs)  # secrets travel in the environment
    assert specs[0].env["ORCH_LLM_API_KEY"] == "sk-secret"


def test_cli_fleet_up_with_a_bad_manifest_exits_2(tmp_path: Path) -> None:
    data = base()
    data["spec"]["workers"][0]["replicas"] = -2
    path = write(tmp_path, data)
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "fleet", "up", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert f"{path}: spec.workers[0].replicas: Input should be greater than or equal to 0" in proc.stderr
    assert not (tmp_path / ".orchestrator").exists()


def test_status_without_state_is_a_config_error(tmp_path: Path) -> None:
    from orchestrator.cli import main

    assert main(["fleet", "status", "--state-file", str(tmp_path / "none.json")]) == 2


def test_the_manager_allows_the_checks_the_manifest_names(tmp_path: Path) -> None:
    data = base(manager={"allowChecks": ["mypkg.checks:is_sorted", "other:fn"]})
    m = load(write(tmp_path, data), plugins=False)
    flags = "--allow-check mypkg.checks:is_sorted --allow-check other:fn"
    assert flags in " ".join(manager_command(m))
    [manager] = [d for d in render_kubernetes(m) if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "t-manager"]
    assert flags in " ".join(manager["spec"]["template"]["spec"]["containers"][0]["args"])
    assert flags in " ".join(render_compose(m)["services"]["manager"]["command"])
    data = base(manager={"allowChecks": ["rm -rf /"]})
    with pytest.raises(ManifestError, match=r"spec\.manager\.allowChecks\[0\]"):
        load(write(tmp_path, data), plugins=False)


def test_the_managers_dispatch_window_comes_from_the_manifest(tmp_path: Path) -> None:
    m = load(write(tmp_path, base(manager={"dispatchWindow": 500})), plugins=False)
    [manager] = [d for d in render_kubernetes(m) if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "t-manager"]
    for argv in (manager_command(m), manager["spec"]["template"]["spec"]["containers"][0]["args"],
                 render_compose(m)["services"]["manager"]["command"]):
        assert "--dispatch-window 500" in " ".join(argv)
    default = load(write(tmp_path, base()), plugins=False)
    assert "--dispatch-window" not in manager_command(default)  # the manager's own default applies
    with pytest.raises(ManifestError, match=r"spec\.manager\.dispatchWindow"):
        load(write(tmp_path, base(manager={"dispatchWindow": 0})), plugins=False)


def test_the_managers_history_mirror_comes_from_the_manifest(tmp_path: Path) -> None:
    m = load(write(tmp_path, base(manager={"mirror": "all"})), plugins=False)
    [manager] = [d for d in render_kubernetes(m) if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "t-manager"]
    for argv in (manager_command(m), manager["spec"]["template"]["spec"]["containers"][0]["args"],
                 render_compose(m)["services"]["manager"]["command"]):
        assert "--mirror all" in " ".join(argv)
    assert "--mirror" not in manager_command(load(write(tmp_path, base()), plugins=False))
    with pytest.raises(ManifestError, match=r"spec\.manager\.mirror"):
        load(write(tmp_path, base(manager={"mirror": "everything"})), plugins=False)
