"""``fleet render``: structure, Kubernetes API schemas, the compose schema, and deploy/ kept in sync."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from orchestrator.fleet.keys import ensure_keyring
from orchestrator.fleet.manifest import FleetManifest, load_manifest, parse_manifest
from orchestrator.fleet.render import KEYS_MOUNT, render_compose, render_kubernetes
from protocol.keyring import Keyring

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "fleet.yaml"
# The compose specification's JSON schema, as shipped in the docker-compose 1.29.2 wheel
# (compose/config/compose_spec.json, Apache-2.0); no PyPI package ships a newer one.
COMPOSE_SCHEMA = Path(__file__).with_name("compose_spec.json")
K8S_VERSION = "1.30.0"


@pytest.fixture(scope="module")
def manifest() -> FleetManifest:
    return load_manifest(EXAMPLE, environ={}, plugins=False, services=False)


@pytest.fixture(scope="module")
def k8s(manifest: FleetManifest) -> list[dict[str, Any]]:
    return render_kubernetes(manifest)


def by(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_every_object_is_valid_against_the_kubernetes_api_schemas(k8s: list[dict[str, Any]]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in k8s:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_structure_selectors_match_labels_and_containers_have_images(k8s: list[dict[str, Any]]) -> None:
    for doc in k8s:
        assert {"apiVersion", "kind", "metadata"} <= doc.keys()
        if doc["kind"] in ("Deployment", "StatefulSet"):
            selector = doc["spec"]["selector"]["matchLabels"]
            assert selector.items() <= doc["spec"]["template"]["metadata"]["labels"].items()
            assert all(c["image"] for c in doc["spec"]["template"]["spec"]["containers"])
        if doc["kind"] == "Service":
            pods = [d for d in k8s if d["kind"] in ("Deployment", "StatefulSet")
                    and doc["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
            assert pods, f"service {doc['metadata']['name']} selects nothing"


def test_workers_manager_redis_vllm(manifest: FleetManifest, k8s: list[dict[str, Any]]) -> None:
    for w in manifest.spec.workers:
        dep = by(k8s, "Deployment", f"demo-worker-{w.capability}")
        assert dep["spec"]["replicas"] == w.replicas
        container = dep["spec"]["template"]["spec"]["containers"][0]
        assert container["resources"]["requests"]["cpu"] == w.resources.cpu
        assert container["resources"]["limits"]["memory"] == w.resources.memory
        assert ["--plugin", w.plugin_ref] == container["args"][2:4]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["ORCH_REDIS_URL"] == "redis://demo-redis:6379/0"
        assert env["ORCH_LLM_URL"] == "http://demo-vllm:8000"
    manager = by(k8s, "StatefulSet", "demo-manager")
    assert manager["spec"]["replicas"] == 1
    assert manager["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "ledger"
    redis = by(k8s, "StatefulSet", "demo-redis")
    assert "--appendonly" in redis["spec"]["template"]["spec"]["containers"][0]["args"]
    assert redis["spec"]["volumeClaimTemplates"]
    vllm = by(k8s, "Deployment", "demo-vllm")["spec"]["template"]["spec"]["containers"][0]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    assert vllm["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert vllm["readinessProbe"]["httpGet"]["path"] == "/health"
    assert vllm["livenessProbe"]["httpGet"]["path"] == "/health"
    assert vllm["args"][0] == "Qwen/Qwen2.5-1.5B-Instruct"
    assert "--max-model-len" in vllm["args"]
    assert by(k8s, "Service", "demo-vllm")["spec"]["ports"][0]["port"] == 8000
    cm = by(k8s, "ConfigMap", "demo-manifest")
    assert yaml.safe_load(cm["data"]["fleet.yaml"])["kind"] == "Fleet"


def test_compose_is_valid_against_the_compose_spec(manifest: FleetManifest) -> None:
    compose = json.loads(json.dumps(render_compose(manifest)))
    jsonschema.Draft201909Validator(json.loads(COMPOSE_SCHEMA.read_text())).validate(compose)
    services = compose["services"]
    assert services["redis"]["command"][1:3] == ["--appendonly", "yes"]
    assert services["vllm"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert services["worker-python"]["deploy"]["replicas"] == 2
    assert all("healthcheck" in services[s] for s in ("redis", "vllm"))
    assert "ledger:/var/lib/orchestrator" in services["manager"]["volumes"]


def test_compose_is_accepted_by_the_compose_spec_parser(manifest: FleetManifest) -> None:
    compose_spec = pytest.importorskip("compose_spec")
    compose_spec.PyCompose.from_yaml(yaml.safe_dump(render_compose(manifest)))


def test_deploy_files_are_in_sync_with_the_manifest(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}  # no ORCH_* overrides
    for target, out in (("kubernetes", tmp_path / "kubernetes"), ("compose", tmp_path)):
        subprocess.run([sys.executable, "-m", "orchestrator.cli", "fleet", "render", "deploy/fleet.yaml",
                        "--target", target, "--output", str(out)], cwd=ROOT, check=True, env=env, timeout=60)
    rendered = sorted(p.name for p in (tmp_path / "kubernetes").iterdir())
    assert rendered == sorted(p.name for p in (ROOT / "deploy" / "kubernetes").iterdir())
    stale = "re-run: orchestrator fleet render deploy/fleet.yaml --target {} --output {}"
    for name in rendered:
        assert (tmp_path / "kubernetes" / name).read_text() == (ROOT / "deploy" / "kubernetes" / name).read_text(), \
            stale.format("kubernetes", "deploy/kubernetes")
    assert (tmp_path / "compose.yaml").read_text() == (ROOT / "deploy" / "compose.yaml").read_text(), \
        stale.format("compose", "deploy")


def test_render_prints_to_stdout_and_never_leaks_the_api_key(tmp_path: Path) -> None:
    data = yaml.safe_load(EXAMPLE.read_text())
    data["spec"]["llm"].pop("apiKeyFromEnv")
    data["spec"]["llm"]["apiKey"] = "sk-very-secret"
    path = tmp_path / "f.yaml"
    path.write_text(yaml.safe_dump(data))
    for target in ("kubernetes", "compose"):
        proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "fleet", "render", str(path), "--target",
                               target], cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "sk-very-secret" not in proc.stdout
        assert list(yaml.safe_load_all(proc.stdout))


def _url_hosts(env: dict[str, Any]) -> dict[str, str]:
    """``ORCH_*_URL`` variable -> the host its URL names (values from a Secret are skipped)."""
    hosts = {}
    for name, value in env.items():
        if name.startswith("ORCH_") and name.endswith("_URL") and isinstance(value, str):
            host = urlsplit(value).hostname
            assert host, f"{name}={value!r} names no host"
            hosts[name] = host
    return hosts


def test_every_compose_url_names_a_rendered_service(manifest: FleetManifest) -> None:
    services = render_compose(manifest)["services"]
    checked = 0
    for name, service in services.items():
        for var, host in _url_hosts(service.get("environment", {})).items():
            assert host in services, f"service {name}: {var} names host {host!r}, not one of {sorted(services)}"
            checked += 1
    assert checked >= 2 * len(manifest.spec.workers)  # Redis and the LLM, in every worker at least


def test_every_kubernetes_url_names_a_rendered_service(k8s: list[dict[str, Any]]) -> None:
    services = {d["metadata"]["name"]: d for d in k8s if d["kind"] == "Service"}
    checked = 0
    for doc in k8s:
        if doc["kind"] not in ("Deployment", "StatefulSet"):
            continue
        for container in doc["spec"]["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in container.get("env", [])}
            for var, host in _url_hosts(env).items():
                assert host in services, f"{doc['metadata']['name']}: {var} names {host!r}, not a rendered Service"
                port = urlsplit(env[var]).port
                assert port in [p["port"] for p in services[host]["spec"]["ports"]], (var, env[var])
                checked += 1
    assert checked >= 2 * len(manifest_workers(k8s))


def manifest_workers(k8s: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in k8s if d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"]


def test_external_redis_is_used_as_given(manifest: FleetManifest) -> None:
    external = manifest.model_copy(update={"spec": manifest.spec.model_copy(update={
        "redis": manifest.spec.redis.model_copy(update={"external": True, "url": "redis://cache.example:6380/2"})})})
    services = render_compose(external)["services"]
    assert "redis" not in services
    assert services["manager"]["environment"]["ORCH_REDIS_URL"] == "redis://cache.example:6380/2"
    assert not any(d["metadata"]["name"] == "demo-redis" for d in render_kubernetes(external))


def test_the_console_is_rendered_with_its_service(manifest: FleetManifest, k8s: list[dict[str, Any]]) -> None:
    assert manifest.ui is not None
    port = manifest.ui.port
    dep = by(k8s, "Deployment", "demo-ui")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][-1] == "ui"
    assert container["args"] == ["--host", "0.0.0.0", "--port", str(port), "--operator", "admin"]
    assert container["ports"] == [{"name": "http", "containerPort": port}]
    assert dep["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    service = by(k8s, "Service", "demo-ui")
    assert service["spec"]["ports"][0]["port"] == port
    assert service["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    compose = render_compose(manifest)["services"]["ui"]
    assert compose["command"] == ["ui", "--host", "0.0.0.0", "--port", str(port), "--operator", "admin"]
    assert compose["ports"] == [f"{port}:{port}"]
    assert compose["depends_on"] == {"redis": {"condition": "service_healthy"}}  # not the LLM


def test_no_console_unless_the_manifest_asks(manifest: FleetManifest) -> None:
    without = manifest.model_copy(update={"spec": manifest.spec.model_copy(update={"ui": None})})
    assert not [d for d in render_kubernetes(without) if "ui" in d["metadata"]["name"].split("-")]
    assert "ui" not in render_compose(without)["services"]
    data = yaml.safe_load(EXAMPLE.read_text())
    data["spec"]["ui"]["enabled"] = False
    disabled = parse_manifest(data, environ={})
    assert disabled.ui is None
    assert "ui" not in render_compose(disabled)["services"]


def key_secrets_mounted(doc: dict[str, Any]) -> list[str]:
    volumes = doc["spec"]["template"]["spec"].get("volumes", [])
    return [v["secret"]["secretName"] for v in volumes if "secret" in v and "-keys-" in v["secret"]["secretName"]]


def test_each_pod_mounts_only_its_own_roles_key_secret(k8s: list[dict[str, Any]]) -> None:
    expected = {"demo-manager": ["demo-keys-manager"], "demo-worker-python": ["demo-keys-worker-python"],
                "demo-worker-llm": ["demo-keys-worker-llm"], "demo-worker-slugify": ["demo-keys-worker-slugify"],
                "demo-ui": ["demo-keys-operator-admin"], "demo-redis": [], "demo-vllm": []}
    pods = {d["metadata"]["name"]: d for d in k8s if d["kind"] in ("Deployment", "StatefulSet")}
    assert {name: key_secrets_mounted(doc) for name, doc in pods.items()} == expected
    for name, secrets in expected.items():
        container = pods[name]["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container.get("env", [])}
        if secrets:
            assert env["ORCH_KEYS"] == KEYS_MOUNT
            assert {"name": "keys", "mountPath": KEYS_MOUNT, "readOnly": True} in container["volumeMounts"]
        else:
            assert "ORCH_KEYS" not in env
    ui = pods["demo-ui"]["spec"]["template"]["spec"]["containers"][0]
    assert ui["args"][-2:] == ["--operator", "admin"]


def test_rendered_key_secrets_hold_the_public_keyring_and_one_private_key(manifest: FleetManifest,
                                                                          tmp_path: Path) -> None:
    ring, _ = ensure_keyring(manifest, tmp_path / "keys")
    docs = render_kubernetes(manifest, ring)
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    mounted = {name for d in docs if d["kind"] in ("Deployment", "StatefulSet") for name in key_secrets_mounted(d)}
    assert set(secrets) == mounted  # one Secret per role, each used
    owners = {"demo-keys-manager": "manager", "demo-keys-worker-python": "worker:python",
              "demo-keys-worker-llm": "worker:llm", "demo-keys-worker-slugify": "worker:slugify",
              "demo-keys-operator-admin": "operator:admin"}
    assert set(secrets) == set(owners)
    for name, doc in secrets.items():
        share = tmp_path / name
        share.mkdir()
        for file, b64 in doc["data"].items():
            (share / file).write_bytes(base64.b64decode(b64))
        loaded = Keyring.load(share)  # a process in that pod loads exactly this
        assert list(loaded.private) == [owners[name]]
        assert set(loaded.public) == set(ring.public)
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    for doc in secrets.values():
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_a_read_only_console_gets_the_public_keyring_only(manifest: FleetManifest, tmp_path: Path) -> None:
    assert manifest.spec.ui is not None
    read_only = manifest.model_copy(update={"spec": manifest.spec.model_copy(update={
        "ui": manifest.spec.ui.model_copy(update={"read_only": True})})})
    ring, _ = ensure_keyring(read_only, tmp_path / "keys")
    docs = render_kubernetes(read_only, ring)
    ui = by(docs, "Deployment", "demo-ui")
    assert key_secrets_mounted(ui) == ["demo-keys-public"]
    assert "--operator" not in ui["spec"]["template"]["spec"]["containers"][0]["args"]
    public = by(docs, "Secret", "demo-keys-public")
    assert list(public["data"]) == ["keyring.json"]
    compose = render_compose(read_only)["services"]["ui"]
    assert [s["source"] for s in compose["secrets"]] == ["keyring"]


def test_each_compose_service_mounts_only_its_own_key_and_the_files_exist(tmp_path: Path) -> None:
    out, keys = tmp_path / "out", tmp_path / "keys"
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", "fleet", "render", str(EXAMPLE), "--target",
                           "compose", "--keys", str(keys), "--output", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "added keys for manager, operator:admin, worker:python, worker:llm, worker:slugify" in proc.stderr
    compose = yaml.safe_load((out / "compose.yaml").read_text())
    jsonschema.Draft201909Validator(json.loads(COMPOSE_SCHEMA.read_text())).validate(compose)
    own = {"manager": "manager.key", "worker-python": "worker.python.key", "worker-llm": "worker.llm.key",
           "worker-slugify": "worker.slugify.key", "ui": "operator.admin.key"}
    for name, service in compose["services"].items():
        targets = sorted(Path(s["target"]).name for s in service.get("secrets", []))
        assert targets == (sorted(["keyring.json", own[name]]) if name in own else []), name
        for s in service.get("secrets", []):
            assert service["environment"]["ORCH_KEYS"] == str(Path(s["target"]).parent)
            file = out / compose["secrets"][s["source"]]["file"]
            assert file.name == Path(s["target"]).name
            assert file.is_file(), file  # the keyring fleet render completed
