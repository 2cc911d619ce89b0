"""The fleet manifest: one YAML file that describes a fleet, read and checked once before anything starts.

```yaml
apiVersion: orchestrator.dev/v1
kind: Fleet
metadata: {name: demo}
spec:
  redis: {url: redis://127.0.0.1:6379/0}
  llm: {url: http://127.0.0.1:8000, model: Qwen/Qwen2.5-7B-Instruct}
  ledger: {path: .orchestrator/demo-ledger.db}
  workers:
    - {capability: python, plugin: python, replicas: 2}
```

``load_manifest`` applies the ``ORCH_*`` environment overrides, validates the file strictly
(unknown fields, types, ranges), loads every plugin and checks that Redis and the LLM answer.
Every failure raises :class:`~protocol.errors.ManifestError` naming the file, the field path
(``spec.workers[1].replicas``) and the reason.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import httpx
import redis
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

from orchestrator.acknowledger import Mirror
from orchestrator.yaml_file import read_yaml
from protocol.errors import ManifestError, PluginLoadError, ServiceUnreachable
from protocol.settings import redact_url
from workers import registry

__all__ = (
    "API_VERSION",
    "ENV_OVERRIDES",
    "KIND",
    "FleetManifest",
    "FleetSpec",
    "LLMSpec",
    "LedgerSpec",
    "ManagerSpec",
    "RedisSpec",
    "Resources",
    "ServeSpec",
    "SupervisorSpec",
    "UISpec",
    "WorkerSpec",
    "check_plugins",
    "check_services",
    "field_path",
    "load_manifest",
    "parse_manifest",
)

API_VERSION = "orchestrator.dev/v1"
KIND = "Fleet"

# Environment variable -> manifest field path; the environment wins over the file.
ENV_OVERRIDES: dict[str, tuple[str, ...]] = {
    "ORCH_REDIS_URL": ("spec", "redis", "url"),
    "ORCH_LLM_URL": ("spec", "llm", "url"),
    "ORCH_LLM_MODEL": ("spec", "llm", "model"),
    "ORCH_LLM_API_KEY": ("spec", "llm", "apiKey"),
    "ORCH_LEDGER": ("spec", "ledger", "path"),
    "ORCH_NAMESPACE": ("spec", "namespace"),
}
VLLM_BINARY_ENV = "ORCH_VLLM_BINARY"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|Ki|Mi|Gi|Ti|M|G|T)?$")


class _Model(BaseModel):
    # Keys are camelCase like Kubernetes objects; snake_case spellings are accepted too.
    model_config = ConfigDict(frozen=True, extra="forbid", alias_generator=to_camel, populate_by_name=True,
                              hide_input_in_errors=True)


class Resources(_Model):
    """What one replica needs; rendered as Kubernetes requests = limits and compose limits."""

    cpu: str | None = Field(None, description="Kubernetes CPU quantity, e.g. '500m' or '2'")
    memory: str | None = Field(None, description="Kubernetes memory quantity, e.g. '512Mi'")
    gpu: int = Field(0, ge=0, description="NVIDIA GPUs (nvidia.com/gpu)")

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _quantity(cls, value: object) -> object:
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        if isinstance(value, str) and not _QUANTITY.match(value):
            raise ValueError(f"{value!r} is not a Kubernetes quantity (e.g. '500m', '2', '512Mi')")
        return value


class RedisSpec(_Model):
    """The bus. Rendered fleets run their own Redis unless ``external`` is true."""

    url: str = "redis://127.0.0.1:6379/0"
    external: bool = Field(False, description="render: use url instead of deploying Redis")
    image: str = "redis:7.4"
    storage: str = Field("1Gi", description="render: persistent volume size for the append-only file")

    @field_validator("url")
    @classmethod
    def _scheme(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"{redact_url(value)!r} must start with redis://, rediss:// or unix://")
        return value


class ServeSpec(_Model):
    """Have the fleet start ``vllm serve`` itself (``fleet up``) or deploy it (``fleet render``)."""

    model: str = Field(min_length=1, description="the model vllm serves (Hugging Face id or path)")
    args: tuple[str, ...] = Field((), description="extra `vllm serve` flags, e.g. ['--max-model-len', '8192']")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    gpus: int = Field(1, ge=0, description="GPUs for the server; >1 adds --tensor-parallel-size")
    command: tuple[str, ...] = Field(("vllm",), min_length=1,
                                     description="the binary (env ORCH_VLLM_BINARY overrides, split like a shell)")
    image: str = "vllm/vllm-openai:v0.33.0"  # the release orchestrator[vllm] pins
    startup_timeout_seconds: float = Field(900.0, gt=0, description="how long `fleet up` waits for /health")
    resources: Resources = Resources()

    @field_validator("args", mode="before")
    @classmethod
    def _stringify(cls, value: object) -> object:
        if isinstance(value, list | tuple):
            return tuple(str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v for v in value)
        return value


class LLMSpec(_Model):
    """The shared OpenAI-compatible server every agent calls."""

    url: str | None = Field(None, description="base URL; with serve set, the served one is used instead")
    model: str | None = Field(None, description="served model name; default: serve.model, else the first")
    api_key: SecretStr | None = None
    api_key_from_env: str | None = Field(None, description="read the key from this environment variable")
    serve: ServeSpec | None = None

    @model_validator(mode="after")
    def _one_key(self) -> LLMSpec:
        if self.api_key is not None and self.api_key_from_env is not None:
            raise ValueError("give apiKey or apiKeyFromEnv, not both")
        return self


class LedgerSpec(_Model):
    """Where the manager keeps its SQLite ledger."""

    path: str = ".orchestrator/ledger.db"
    storage: str = Field("1Gi", description="render: persistent volume size")


class ManagerSpec(_Model):
    """The manager: one leader per fleet."""

    replicas: Literal[1] = 1
    lease_seconds: float = Field(5.0, gt=0, description="leadership lease (--manager-lease-s)")
    resources: Resources = Resources()
    allow_checks: list[Annotated[str, Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")]] = Field(
        default_factory=list, description="module:function checks jobs may name besides installed ones (--allow-check)")
    dispatch_window: int | None = Field(None, ge=1, description="the most tasks of one run in flight "
                                                                 "(--dispatch-window; default: the manager's, 10,000)")
    mirror: Mirror | None = Field(
        None, description="whose history goes to the bus: runs someone follows, every run, none (--mirror; "
                          "default: followed)")

    def flags(self) -> list[str]:
        """The manager's flags from this section, besides its lease (each process kind adds its own)."""
        window = [] if self.dispatch_window is None else ["--dispatch-window", str(self.dispatch_window)]
        mirror = [] if self.mirror is None else ["--mirror", self.mirror]
        return [*(flag for ref in self.allow_checks for flag in ("--allow-check", ref)), *window, *mirror]


class WorkerSpec(_Model):
    """One capability: which plugin serves it, how many processes and how much each takes at once."""

    capability: str = Field(min_length=1)
    plugin: str | None = Field(None, description="entry point name or module:Class (default: the capability)")
    replicas: int = Field(1, ge=0)
    concurrency: int = Field(8, ge=1)
    config: dict[str, JsonValue] = Field(default_factory=dict)
    resources: Resources = Resources()

    @property
    def plugin_ref(self) -> str:
        """The plugin to load: ``plugin`` or, by default, the capability's entry point."""
        return self.plugin or self.capability


class UISpec(_Model):
    """The operator's web console (``orchestrator ui``), run beside the manager."""

    enabled: bool = Field(True, description="false keeps the section but runs no console")
    host: str = Field("127.0.0.1", description="fleet up: the address it binds (render: always 0.0.0.0)")
    port: int = Field(8080, ge=1, le=65535)
    replicas: int = Field(1, ge=0, description="render: console pods behind the Service")
    operator: str | None = Field(None, description="the operator key the console acts with (default: the "
                                                   "keyring's only operator, else admin)")
    read_only: bool = Field(False, description="hand the console no operator key: it shows, nobody acts")
    resources: Resources = Resources()


class SupervisorSpec(_Model):
    """How ``fleet up`` restarts processes."""

    backoff_seconds: float = Field(0.5, gt=0, description="first restart delay; doubles per quick crash")
    max_backoff_seconds: float = Field(30.0, gt=0)
    max_quick_restarts: int = Field(5, ge=0, description="give up after this many restarts in a row that "
                                                         "each ran less than stableSeconds")
    stable_seconds: float = Field(10.0, gt=0, description="a process that ran this long resets the count")
    grace_period_seconds: float = Field(15.0, gt=0, description="SIGTERM to SIGKILL on shutdown")


class FleetSpec(_Model):
    """Everything a fleet runs."""

    namespace: str = Field("orch", pattern=r"^[^{}: ]+$", description="bus key prefix (ORCH_NAMESPACE)")
    lease_seconds: float = Field(30.0, gt=0, description="task lease: a dead worker's task is retried after it")
    image: str = Field("orchestrator:0.1.0", description="render: image with orchestrator and the plugins")
    redis: RedisSpec = RedisSpec()
    llm: LLMSpec = LLMSpec()
    ledger: LedgerSpec = LedgerSpec()
    manager: ManagerSpec = ManagerSpec()
    workers: tuple[WorkerSpec, ...] = ()
    ui: UISpec | None = Field(None, description="the operator's web console; absent: none")
    supervisor: SupervisorSpec = SupervisorSpec()

    @field_validator("workers", mode="before")
    @classmethod
    def _map_form(cls, value: object) -> object:
        # ``workers: {python: {replicas: 2}}`` is the same as a list with capability set from the key.
        if isinstance(value, Mapping):
            return [{"capability": k, **v} if isinstance(v, Mapping) else v for k, v in value.items()]
        return value

    @field_validator("workers")
    @classmethod
    def _unique(cls, value: tuple[WorkerSpec, ...]) -> tuple[WorkerSpec, ...]:
        seen: set[str] = set()
        for w in value:
            if w.capability in seen:
                raise ValueError(f"capability {w.capability!r} is listed twice")
            seen.add(w.capability)
        return value


class Metadata(_Model):
    """The fleet's name: process names, the state file and rendered object names derive from it."""

    name: str = Field(max_length=40)
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _dns(cls, value: str) -> str:
        if not _DNS_LABEL.match(value):
            raise ValueError(f"{value!r} must be lowercase letters, digits and '-' (a DNS label)")
        return value


class FleetManifest(_Model):
    """A whole manifest (``apiVersion: orchestrator.dev/v1``, ``kind: Fleet``)."""

    api_version: Literal["orchestrator.dev/v1"]
    kind: Literal["Fleet"]
    metadata: Metadata
    spec: FleetSpec

    @property
    def name(self) -> str:
        """``metadata.name``."""
        return self.metadata.name

    @property
    def llm_url(self) -> str | None:
        """The URL every process uses: the served server's when the fleet serves one, else ``llm.url``."""
        serve = self.spec.llm.serve
        if serve is not None:
            host = "127.0.0.1" if serve.host in ("0.0.0.0", "::") else serve.host
            return f"http://{host}:{serve.port}"
        return self.spec.llm.url

    @property
    def ui(self) -> UISpec | None:
        """The console to run, or None when the manifest has none (or disables it)."""
        ui = self.spec.ui
        return ui if ui is not None and ui.enabled else None

    @property
    def llm_model(self) -> str | None:
        """The served model name processes ask for."""
        serve = self.spec.llm.serve
        return self.spec.llm.model or (serve.model if serve else None)

    def api_key(self, environ: Mapping[str, str] | None = None) -> str | None:
        """The LLM API key: ``apiKey``, or the variable ``apiKeyFromEnv`` names."""
        llm = self.spec.llm
        if llm.api_key is not None:
            return llm.api_key.get_secret_value()
        if llm.api_key_from_env:
            return (os.environ if environ is None else environ).get(llm.api_key_from_env)
        return None

    def to_yaml(self) -> str:
        """The manifest as YAML, without a literal API key (rendered output must not leak it)."""
        data = self.model_dump(mode="json", by_alias=True, exclude_unset=True)
        data["apiVersion"], data["kind"] = API_VERSION, KIND
        data["spec"].get("llm", {}).pop("apiKey", None)
        return yaml.safe_dump(data, sort_keys=False)


def field_path(loc: tuple[int | str, ...]) -> str:
    """``('spec', 'workers', 1, 'replicas')`` -> ``spec.workers[1].replicas``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part:
            out += f".{part}" if out else str(part)
    return out


def _reason(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "missing":
        return "is required"
    value = error.get("input")
    if isinstance(value, int | float) and not isinstance(value, bool):  # never echo strings: they may be secrets
        return f"{error['msg']} (got {value!r})"
    return str(error["msg"])


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> None:
    for name, path in ENV_OVERRIDES.items():
        value = environ.get(name)
        if not value:
            continue
        node = data
        for key in path[:-1]:
            child = node.get(key)
            if not isinstance(child, dict):
                child = node[key] = {}
            node = child
        if name == "ORCH_LLM_API_KEY":
            node.pop("apiKeyFromEnv", None)
            node.pop("api_key_from_env", None)
            node.pop("api_key", None)
        if name == "ORCH_LLM_URL":
            # An explicit server from the environment replaces the one the manifest would serve.
            node.pop("serve", None)
        node[path[-1]] = value
    binary = environ.get(VLLM_BINARY_ENV)
    serve = data.get("spec", {}).get("llm", {}).get("serve") if isinstance(data.get("spec"), dict) else None
    if binary and isinstance(serve, dict):
        serve["command"] = shlex.split(binary)


def parse_manifest(data: object, *, source: str = "<manifest>",
                   environ: Mapping[str, str] | None = None) -> FleetManifest:
    """Validate a manifest already read from YAML, after the environment overrides; no I/O."""
    if not isinstance(data, dict):
        raise ManifestError(f"a manifest is a mapping with apiVersion, kind, metadata and spec, "
                            f"not {type(data).__name__}", source=source)
    copied: dict[str, Any] = _deep_copy(data)
    _apply_env(copied, os.environ if environ is None else environ)
    try:
        return FleetManifest.model_validate(copied)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = exc.error_count() - 1
        suffix = f" (and {more} more error{'s' if more > 1 else ''})" if more else ""
        raise ManifestError(_reason(first) + suffix, source=source,
                            field=field_path(first["loc"]) or None) from exc


def _deep_copy(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _deep_copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_deep_copy(v) for v in value]
    return value


def check_plugins(manifest: FleetManifest, *, source: str = "<manifest>") -> None:
    """Load every worker plugin here, so an unknown or broken one fails before any process starts."""
    for i, worker in enumerate(manifest.spec.workers):
        field = f"spec.workers[{i}].plugin"
        try:
            cls = registry.load(worker.plugin_ref)
        except PluginLoadError as exc:
            raise ManifestError(f"unknown plugin: {exc}", source=source, field=field) from exc
        if cls.capability != worker.capability:
            raise ManifestError(f"plugin {worker.plugin_ref!r} serves capability {cls.capability!r}, "
                                f"not {worker.capability!r}", source=source, field=field)
        if cls.needs_inference and manifest.llm_url is None and worker.replicas:
            raise ManifestError(f"capability {worker.capability!r} needs a language model: set spec.llm.url, "
                                "spec.llm.serve or ORCH_LLM_URL", source=source, field="spec.llm")


def check_services(manifest: FleetManifest, *, source: str = "<manifest>", timeout_s: float = 2.0) -> None:
    """PING Redis, and GET the LLM server's /health (or /v1/models) unless the fleet serves it itself."""
    url = manifest.spec.redis.url
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        raise ServiceUnreachable(f"Redis at {redact_url(url)} does not answer PING within {timeout_s}s: "
                                 f"{type(exc).__name__}: {exc}", source=source, field="spec.redis.url") from exc
    finally:
        client.close()
    llm = manifest.spec.llm
    if llm.serve is None and llm.url:
        health = llm.url.rstrip("/").removesuffix("/v1") + "/health"
        try:
            response = httpx.get(health, timeout=timeout_s)
        except httpx.HTTPError as exc:
            raise ServiceUnreachable(f"LLM server {health} is unreachable: {type(exc).__name__}: {exc}",
                                     source=source, field="spec.llm.url") from exc
        if response.status_code in (404, 405):
            # Not vLLM: any OpenAI-compatible server lists its models at /v1/models.
            health = health.removesuffix("/health") + "/v1/models"
            try:
                response = httpx.get(health, timeout=timeout_s)
            except httpx.HTTPError as exc:
                raise ServiceUnreachable(f"LLM server {health} is unreachable: {type(exc).__name__}: {exc}",
                                         source=source, field="spec.llm.url") from exc
        if response.status_code not in (200, 401):  # 401: up, and the workers bring the API key
            raise ServiceUnreachable(f"LLM server {health} answered HTTP {response.status_code}",
                                     source=source, field="spec.llm.url")


def load_manifest(path: str | os.PathLike[str], environ: Mapping[str, str] | None = None, *,
                  plugins: bool = True, services: bool = True) -> FleetManifest:
    """Read, override from ``environ`` (default ``os.environ``), validate and check a manifest file.

    ``plugins=False`` skips loading the plugins (``fleet render``: they live in the image), and
    ``services=False`` skips the Redis and LLM checks.
    """
    source = str(path)
    data = read_yaml(path, ManifestError, what="the manifest")
    manifest = parse_manifest(data, source=source, environ=environ)
    if plugins:
        check_plugins(manifest, source=source)
    if services:
        check_services(manifest, source=source)
    return manifest
