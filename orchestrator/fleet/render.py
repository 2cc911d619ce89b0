"""Render a fleet manifest for a cluster: Kubernetes objects or a compose file.

Kubernetes (``render_kubernetes``): a ConfigMap holding the manifest; Redis as a StatefulSet
with a persistent volume and ``--appendonly yes`` plus its Service; vLLM (``vllm/vllm-openai``)
as a Deployment with an ``nvidia.com/gpu`` request, ``/health`` startup, readiness and liveness
probes and a Service on 8000 (when ``spec.llm.serve`` is set); the manager as a single-replica
StatefulSet with a volumeClaimTemplate for its ledger and a headless Service; one Deployment per
worker capability with the manifest's replicas and resources. Pods find each other through
``ORCH_*`` environment variables; the LLM API key comes from the Secret ``<name>-secrets``
(key ``llm-api-key``, optional), never from the rendered text. Each pod on the bus mounts one
Secret of the fleet's keyring, its own role's (``NAME-keys-manager``, ``NAME-keys-worker-CAP``,
``NAME-keys-operator-NAME`` for the console) at ``KEYS_MOUNT``; ``render_kubernetes(m, ring)``
also renders those Secrets from a keyring.

Compose (``render_compose``): the same services on one machine, with a GPU device reservation
for vLLM, named volumes for Redis and the ledger, ``deploy.replicas`` for workers and
healthchecks. With ``spec.ui``, the operator's console: a Deployment and Service ``<name>-ui``
(Kubernetes) or a ``ui`` service publishing its port (compose).
"""

from __future__ import annotations

import base64
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml

from orchestrator.fleet.commands import vllm_command
from orchestrator.fleet.keys import PUBLIC_SHARE, console_operator, fleet_identities, share_name
from orchestrator.fleet.manifest import FleetManifest, Resources, WorkerSpec
from protocol.keyring import PUBLIC_FILE, Keyring, identity, role_of

__all__ = ("KEYS_MOUNT", "dump_documents", "key_file", "render_compose", "render_kubernetes", "render_kubernetes_files",
           "secret_name")

LEDGER_DIR = "/var/lib/orchestrator"
MANIFEST_DIR = "/etc/orchestrator"
# deploy/Dockerfile's non-root user; fsGroup lets it write the ledger volume.
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001}
VLLM_PORT = 8000
SECRET_KEY = "llm-api-key"
# ORCH_KEYS of every pod on the bus: the public keyring and its role's key. Not under MANIFEST_DIR: a mount
# point inside a read-only configMap volume cannot be created.
KEYS_MOUNT = "/etc/orchestrator-keys"

Doc = dict[str, Any]


def _dns(text: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63] or "x"


def _labels(m: FleetManifest, component: str, capability: str | None = None) -> dict[str, str]:
    labels = {"app.kubernetes.io/name": "orchestrator", "app.kubernetes.io/instance": m.name,
              "app.kubernetes.io/component": component}
    if capability is not None:
        labels["orchestrator.dev/capability"] = _dns(capability)
    return labels


def _meta(m: FleetManifest, name: str, labels: dict[str, str]) -> Doc:
    return {"name": name, "labels": {**m.metadata.labels, **labels}}


def _redis_url(m: FleetManifest, host: str) -> str:
    return m.spec.redis.url if m.spec.redis.external else f"redis://{host}:6379/0"


def _llm_url(m: FleetManifest, host: str) -> str | None:
    return f"http://{host}:{VLLM_PORT}" if m.spec.llm.serve is not None else m.spec.llm.url


def _env(m: FleetManifest, *, llm_host: str, redis_host: str) -> list[Doc]:
    env: list[Doc] = [{"name": "ORCH_REDIS_URL", "value": _redis_url(m, redis_host)},
                      {"name": "ORCH_NAMESPACE", "value": m.spec.namespace},
                      {"name": "ORCH_LEASE_S", "value": f"{m.spec.lease_seconds:g}"}]
    url = _llm_url(m, llm_host)
    if url:
        env.append({"name": "ORCH_LLM_URL", "value": url})
    if m.llm_model:
        env.append({"name": "ORCH_LLM_MODEL", "value": m.llm_model})
    if _has_key(m):
        env.append(_secret_env("ORCH_LLM_API_KEY", m))
    return env


def _k8s_env(m: FleetManifest) -> list[Doc]:
    # Pods reach each other through the Services `NAME-redis` and `NAME-vllm`.
    return _env(m, llm_host=f"{m.name}-vllm", redis_host=f"{m.name}-redis")


def _has_key(m: FleetManifest) -> bool:
    return m.spec.llm.api_key is not None or m.spec.llm.api_key_from_env is not None


def _secret_env(name: str, m: FleetManifest) -> Doc:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": f"{m.name}-secrets", "key": SECRET_KEY,
                                                         "optional": True}}}


def _resources(r: Resources) -> Doc:
    amounts: dict[str, Any] = {}
    if r.cpu:
        amounts["cpu"] = r.cpu
    if r.memory:
        amounts["memory"] = r.memory
    if r.gpu:
        amounts["nvidia.com/gpu"] = r.gpu
    return {"requests": dict(amounts), "limits": dict(amounts)} if amounts else {}


def _manifest_volume(m: FleetManifest) -> tuple[Doc, Doc]:
    volume = {"name": "manifest", "configMap": {"name": f"{m.name}-manifest"}}
    mount = {"name": "manifest", "mountPath": MANIFEST_DIR, "readOnly": True}
    return volume, mount


def _container(name: str, image: str, **fields: Any) -> Doc:
    return {"name": name, "image": image, **{k: v for k, v in fields.items() if v not in (None, {}, [])}}


def _configmap(m: FleetManifest) -> Doc:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(m, f"{m.name}-manifest", _labels(m, "config")),
            "data": {"fleet.yaml": m.to_yaml()}}


def _service(m: FleetManifest, name: str, component: str, port: int, *, headless: bool = False) -> Doc:
    spec: Doc = {"selector": _labels(m, component), "ports": [{"name": component, "port": port,
                                                              "targetPort": port}]}
    if headless:
        spec["clusterIP"] = "None"
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(m, name, _labels(m, component)), "spec": spec}


def _redis(m: FleetManifest) -> list[Doc]:
    r = m.spec.redis
    labels = _labels(m, "redis")
    probe = {"exec": {"command": ["redis-cli", "ping"]}, "periodSeconds": 10, "timeoutSeconds": 5}
    container = _container(
        "redis", r.image, args=["--appendonly", "yes", "--appendfsync", "everysec", "--dir", "/data"],
        ports=[{"name": "redis", "containerPort": 6379}],
        volumeMounts=[{"name": "data", "mountPath": "/data"}],
        readinessProbe={**probe, "initialDelaySeconds": 2}, livenessProbe={**probe, "initialDelaySeconds": 15})
    sts = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta(m, f"{m.name}-redis", labels),
           "spec": {"serviceName": f"{m.name}-redis", "replicas": 1, "selector": {"matchLabels": labels},
                    "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
                    "volumeClaimTemplates": [_claim("data", r.storage)]}}
    return [_service(m, f"{m.name}-redis", "redis", 6379), sts]


def _claim(name: str, size: str) -> Doc:
    return {"metadata": {"name": name},
            "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": size}}}}


def _vllm(m: FleetManifest) -> list[Doc]:
    serve = m.spec.llm.serve
    assert serve is not None
    labels = _labels(m, "vllm")
    # In the image, `vllm serve` listens on every interface on port 8000.
    argv = vllm_command(serve.model_copy(update={"command": ("vllm",), "host": "0.0.0.0", "port": VLLM_PORT}),
                        served_model_name=m.llm_model)
    gpus = max(serve.gpus, serve.resources.gpu)
    resources = _resources(serve.resources.model_copy(update={"gpu": gpus}))
    health = {"httpGet": {"path": "/health", "port": VLLM_PORT}}
    container = _container(
        "vllm", serve.image, command=argv[:2], args=argv[2:],
        ports=[{"name": "http", "containerPort": VLLM_PORT}],
        env=[_secret_env("VLLM_API_KEY", m)] if _has_key(m) else [],
        resources=resources,
        volumeMounts=[{"name": "cache", "mountPath": "/root/.cache/huggingface"},
                      {"name": "shm", "mountPath": "/dev/shm"}],
        # Loading weights takes minutes: the startup probe holds the others off until /health answers.
        startupProbe={**health, "periodSeconds": 10, "failureThreshold": int(serve.startup_timeout_seconds // 10)},
        readinessProbe={**health, "periodSeconds": 5, "failureThreshold": 3},
        livenessProbe={**health, "periodSeconds": 15, "failureThreshold": 4, "timeoutSeconds": 5})
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(m, f"{m.name}-vllm", labels),
        "spec": {"replicas": 1, "strategy": {"type": "Recreate"}, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": {
                     "containers": [container],
                     "volumes": [{"name": "cache", "emptyDir": {}},
                                 {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}]}}}}
    return [_service(m, f"{m.name}-vllm", "vllm", VLLM_PORT), deployment]


# -- keys: one share (public keyring + one role's private key) per role, mounted only where it is needed --------


def key_file(ident: str) -> str:
    """The file a keyring keeps ``ident``'s private key in (``manager.key``, ``worker.python.key``)."""
    role, name = role_of(ident)
    return f"{role}.{name}.key" if name else f"{role}.key"


def _share_of(m: FleetManifest, role: str, capability: str = "", ring: Keyring | None = None) -> str | None:
    """The identity whose private key a pod of ``role`` holds; None for the read-only console."""
    if role == "manager":
        return "manager"
    if role == "worker":
        return identity("worker", capability)
    return console_operator(m, ring)


def secret_name(m: FleetManifest, ident: str | None) -> str:
    """``NAME-keys-manager``, ``NAME-keys-worker-python``, ``NAME-keys-operator-admin``, ``NAME-keys-public``."""
    return f"{m.name}-keys-{_dns(share_name(ident) if ident else PUBLIC_SHARE)}"


def _key_volume(m: FleetManifest, ident: str | None) -> tuple[Doc, Doc, Doc]:
    # 0440: readable by the pod's fsGroup (10001), as the runAsUser is not the files' owner.
    volume = {"name": "keys", "secret": {"secretName": secret_name(m, ident), "defaultMode": 0o440}}
    mount = {"name": "keys", "mountPath": KEYS_MOUNT, "readOnly": True}
    return volume, mount, {"name": "ORCH_KEYS", "value": KEYS_MOUNT}


def _key_secrets(m: FleetManifest, ring: Keyring) -> list[Doc]:
    """One Secret per role, holding the public keyring and that role's private key (``Keyring.export``)."""
    idents: list[str | None] = list(fleet_identities(m, ring))
    if m.ui is not None and console_operator(m, ring) is None:
        idents.append(None)  # the read-only console: the public keyring alone
    docs = []
    with tempfile.TemporaryDirectory() as tmp:
        for ident in idents:
            share = ring.export(Path(tmp) / share_name(ident or PUBLIC_SHARE), [ident] if ident else []).path
            data = {f.name: base64.b64encode(f.read_bytes()).decode() for f in sorted(share.iterdir())}
            docs.append({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                         "metadata": _meta(m, secret_name(m, ident), _labels(m, "keys")), "data": data})
    return docs


def _manager(m: FleetManifest, ring: Keyring | None = None) -> list[Doc]:
    labels = _labels(m, "manager")
    volume, mount = _manifest_volume(m)
    key_volume, key_mount, key_env = _key_volume(m, _share_of(m, "manager", ring=ring))
    ledger = f"{LEDGER_DIR}/ledger.db"
    container = _container(
        "manager", m.spec.image, command=["orchestrator", "--log-level", "INFO", "manager"],
        args=["--ledger", ledger, "--manager-lease-s", f"{m.spec.manager.lease_seconds:g}", *m.spec.manager.flags()],
        env=[*_k8s_env(m), {"name": "ORCH_LEDGER", "value": ledger}, key_env],
        resources=_resources(m.spec.manager.resources),
        volumeMounts=[{"name": "ledger", "mountPath": LEDGER_DIR}, mount, key_mount])
    sts = {"apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": _meta(m, f"{m.name}-manager", labels),
           "spec": {"serviceName": f"{m.name}-manager", "replicas": 1, "selector": {"matchLabels": labels},
                    "template": {"metadata": {"labels": labels}, "spec": {
                        "terminationGracePeriodSeconds": int(m.spec.supervisor.grace_period_seconds),
                        "securityContext": POD_SECURITY, "containers": [container],
                        "volumes": [volume, key_volume]}},
                    "volumeClaimTemplates": [_claim("ledger", m.spec.ledger.storage)]}}
    return [_service(m, f"{m.name}-manager", "manager", 9000, headless=True), sts]


def _worker(m: FleetManifest, w: WorkerSpec, ring: Keyring | None = None) -> Doc:
    labels = _labels(m, "worker", w.capability)
    volume, mount = _manifest_volume(m)
    key_volume, key_mount, key_env = _key_volume(m, _share_of(m, "worker", w.capability, ring))
    grace = m.spec.supervisor.grace_period_seconds
    container = _container(
        "worker", m.spec.image, command=["orchestrator", "--log-level", "INFO", "worker"],
        args=["--capability", w.capability, "--plugin", w.plugin_ref, "--concurrency", str(w.concurrency),
              "--config", json.dumps(w.config, separators=(",", ":")), "--drain-s", f"{max(grace * 2 / 3, 0.5):g}"],
        env=[*_k8s_env(m), key_env], resources=_resources(w.resources), volumeMounts=[mount, key_mount])
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": _meta(m, f"{m.name}-worker-{_dns(w.capability)}", labels),
            "spec": {"replicas": w.replicas, "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels}, "spec": {
                         "terminationGracePeriodSeconds": int(grace), "securityContext": POD_SECURITY,
                         "containers": [container], "volumes": [volume, key_volume]}}}}


def _ui_args(m: FleetManifest, operator: str | None) -> list[str]:
    assert m.ui is not None
    args = ["--host", "0.0.0.0", "--port", str(m.ui.port)]
    return [*args, "--operator", operator.removeprefix("operator:")] if operator else args


def _ui(m: FleetManifest, ring: Keyring | None = None) -> list[Doc]:
    ui = m.ui
    assert ui is not None
    labels = _labels(m, "ui")
    operator = _share_of(m, "ui", ring=ring)
    key_volume, key_mount, key_env = _key_volume(m, operator)
    probe = {"tcpSocket": {"port": ui.port}, "periodSeconds": 10}
    container = _container(
        "ui", m.spec.image, command=["orchestrator", "--log-level", "INFO", "ui"],
        args=_ui_args(m, operator), ports=[{"name": "http", "containerPort": ui.port}],
        env=[*_k8s_env(m), key_env], resources=_resources(ui.resources), volumeMounts=[key_mount],
        readinessProbe={**probe, "initialDelaySeconds": 2}, livenessProbe={**probe, "initialDelaySeconds": 15})
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _meta(m, f"{m.name}-ui", labels),
        "spec": {"replicas": ui.replicas, "selector": {"matchLabels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": {
                     "securityContext": POD_SECURITY, "containers": [container], "volumes": [key_volume]}}}}
    return [_service(m, f"{m.name}-ui", "ui", ui.port), deployment]


def render_kubernetes_files(m: FleetManifest, ring: Keyring | None = None) -> dict[str, list[Doc]]:
    """The Kubernetes objects grouped by file name (``configmap.yaml``, ``redis.yaml``, ...).

    With ``ring``, ``keys.yaml`` holds one Secret per role made from it (private keys: keep that file out
    of version control); without, the pods name those Secrets and you create them (docs/fleet.md).
    """
    files: dict[str, list[Doc]] = {"configmap.yaml": [_configmap(m)]}
    if ring is not None:
        files["keys.yaml"] = _key_secrets(m, ring)
    if not m.spec.redis.external:
        files["redis.yaml"] = _redis(m)
    if m.spec.llm.serve is not None:
        files["vllm.yaml"] = _vllm(m)
    files["manager.yaml"] = _manager(m, ring)
    if m.spec.workers:
        files["workers.yaml"] = [_worker(m, w, ring) for w in m.spec.workers]
    if m.ui is not None:
        files["ui.yaml"] = _ui(m, ring)
    return files


def render_kubernetes(m: FleetManifest, ring: Keyring | None = None) -> list[Doc]:
    """Every Kubernetes object of the fleet, in apply order."""
    return [doc for docs in render_kubernetes_files(m, ring).values() for doc in docs]


def _compose_resources(r: Resources) -> Doc:
    limits: Doc = {}
    if r.cpu:
        limits["cpus"] = str(int(r.cpu[:-1]) / 1000) if r.cpu.endswith("m") else r.cpu
    if r.memory:
        limits["memory"] = re.sub(r"(Ki|Mi|Gi|Ti)$", lambda g: g.group(1)[0].lower(), r.memory)
    return {"limits": limits} if limits else {}


def _compose_keys(m: FleetManifest, ident: str | None, keys_path: str, secrets: Doc) -> Doc:
    """A service's share of the keyring as compose file secrets mounted at ``KEYS_MOUNT``; adds them to ``secrets``."""
    secrets["keyring"] = {"file": f"{keys_path}/{PUBLIC_FILE}"}
    mounts = [{"source": "keyring", "target": f"{KEYS_MOUNT}/{PUBLIC_FILE}"}]
    if ident is not None:
        name = f"key-{_dns(share_name(ident))}"
        secrets[name] = {"file": f"{keys_path}/{key_file(ident)}"}
        mounts.append({"source": name, "target": f"{KEYS_MOUNT}/{key_file(ident)}"})
    return {"secrets": mounts}


def render_compose(m: FleetManifest, *, ring: Keyring | None = None, keys_path: str = "./keys") -> Doc:
    """A compose file (compose specification) for the fleet on one machine.

    Each service on the bus mounts the keyring's ``keyring.json`` and its own role's key file from
    ``keys_path`` (relative to the compose file) at ``KEYS_MOUNT``; ``ring`` only picks the console's
    operator (its only operator key), as ``fleet up`` does.
    """
    # Compose services reach each other by service name: `redis`, `vllm`.
    env = {e["name"]: e["value"] for e in _env(m, llm_host="vllm", redis_host="redis") if "value" in e}
    if _has_key(m):
        env["ORCH_LLM_API_KEY"] = "${ORCH_LLM_API_KEY:-}"
    services: Doc = {}
    depends: Doc = {}
    volumes: Doc = {"ledger": {}}
    secrets: Doc = {}
    env["ORCH_KEYS"] = KEYS_MOUNT
    if not m.spec.redis.external:
        services["redis"] = {
            "image": m.spec.redis.image, "command": ["redis-server", "--appendonly", "yes", "--dir", "/data"],
            "volumes": ["redis-data:/data"], "restart": "unless-stopped",
            "healthcheck": {"test": ["CMD", "redis-cli", "ping"], "interval": "5s", "timeout": "3s", "retries": 10}}
        volumes["redis-data"] = {}
        depends["redis"] = {"condition": "service_healthy"}
    serve = m.spec.llm.serve
    if serve is not None:
        argv = vllm_command(serve.model_copy(update={"command": ("vllm",), "host": "0.0.0.0", "port": VLLM_PORT}),
                            served_model_name=m.llm_model)
        gpus = max(serve.gpus, serve.resources.gpu)
        services["vllm"] = {
            "image": serve.image, "entrypoint": argv[:2], "command": argv[2:], "ipc": "host",
            "ports": [f"{VLLM_PORT}:{VLLM_PORT}"], "volumes": ["hf-cache:/root/.cache/huggingface"],
            "restart": "unless-stopped",
            **({"environment": {"VLLM_API_KEY": "${ORCH_LLM_API_KEY:-}"}} if _has_key(m) else {}),
            "deploy": {"resources": {"reservations": {"devices": [
                {"driver": "nvidia", "count": gpus, "capabilities": ["gpu"]}]}}},
            "healthcheck": {"test": ["CMD", "python3", "-c", "import urllib.request; urllib.request.urlopen("
                                     f"'http://127.0.0.1:{VLLM_PORT}/health')"],
                            "interval": "10s", "timeout": "5s", "retries": 5,
                            "start_period": f"{int(serve.startup_timeout_seconds)}s"}}
        volumes["hf-cache"] = {}
        depends["vllm"] = {"condition": "service_healthy"}
    ledger = f"{LEDGER_DIR}/ledger.db"
    grace = f"{int(m.spec.supervisor.grace_period_seconds)}s"
    manager: Doc = {
        "image": m.spec.image, "entrypoint": ["orchestrator", "--log-level", "INFO"],
        "command": ["manager", "--ledger", ledger, "--manager-lease-s", f"{m.spec.manager.lease_seconds:g}",
                    *m.spec.manager.flags()],
        "environment": {**env, "ORCH_LEDGER": ledger}, "volumes": [f"ledger:{LEDGER_DIR}"],
        **_compose_keys(m, "manager", keys_path, secrets), "restart": "unless-stopped", "stop_grace_period": grace}
    if depends:
        manager["depends_on"] = dict(depends)
    if (res := _compose_resources(m.spec.manager.resources)):
        manager["deploy"] = {"resources": res}
    services["manager"] = manager
    for w in m.spec.workers:
        grace_s = m.spec.supervisor.grace_period_seconds
        worker: Doc = {
            "image": m.spec.image, "entrypoint": ["orchestrator", "--log-level", "INFO"],
            "command": ["worker", "--capability", w.capability, "--plugin", w.plugin_ref, "--concurrency",
                        str(w.concurrency), "--config", json.dumps(w.config, separators=(",", ":")),
                        "--drain-s", f"{max(grace_s * 2 / 3, 0.5):g}"],
            "environment": dict(env), **_compose_keys(m, identity("worker", w.capability), keys_path, secrets),
            "restart": "unless-stopped", "stop_grace_period": grace, "deploy": {"replicas": w.replicas}}
        if (res := _compose_resources(w.resources)):
            worker["deploy"]["resources"] = res
        if w.resources.gpu:
            worker["deploy"].setdefault("resources", {})["reservations"] = {"devices": [
                {"driver": "nvidia", "count": w.resources.gpu, "capabilities": ["gpu"]}]}
        if depends:
            worker["depends_on"] = dict(depends)
        services[f"worker-{_dns(w.capability)}"] = worker
    if m.ui is not None:
        operator = _share_of(m, "ui", ring=ring)
        ui: Doc = {
            "image": m.spec.image, "entrypoint": ["orchestrator", "--log-level", "INFO"],
            "command": ["ui", *_ui_args(m, operator)], "environment": dict(env),
            **_compose_keys(m, operator, keys_path, secrets),
            "ports": [f"{m.ui.port}:{m.ui.port}"], "restart": "unless-stopped"}
        if (res := _compose_resources(m.ui.resources)):
            ui["deploy"] = {"resources": res}
        if "redis" in depends:  # the console reads the bus; it does not need the LLM
            ui["depends_on"] = {"redis": depends["redis"]}
        services["ui"] = ui
    return {"services": services, "volumes": volumes, "secrets": secrets}


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # write shared dicts (labels, the security context) out in full: no &id001 anchors


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_documents(docs: list[Doc], *, header: str = "") -> str:
    """YAML text: ``docs`` as a multi-document stream (``---`` between), keys in insertion order."""
    body = "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=120) for d in docs)
    return header + body
