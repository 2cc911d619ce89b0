"""``InferenceSettings``: where the vLLM server is and how hard to push it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

__all__ = ("InferenceSettings",)

_ENV = {
    "ORCH_LLM_URL": "url",
    "ORCH_LLM_MODEL": "model",
    "ORCH_LLM_API_KEY": "api_key",
    "ORCH_LLM_TIMEOUT": "timeout",
    "ORCH_LLM_MAX_RETRIES": "max_retries",
    "ORCH_LLM_MAX_CONCURRENCY": "max_concurrency",
    "ORCH_LLM_HTTP": "http",
}


class InferenceSettings(BaseModel):
    """Settings of the shared ``InferenceClient``; read once with ``from_env()`` and passed down."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field("http://127.0.0.1:8000", description="server base URL; a trailing /v1 is accepted")
    model: str | None = Field(None, description="served model name; None = the first one /v1/models lists")
    api_key: SecretStr | None = Field(None, description="vLLM --api-key; sent as a bearer token")
    timeout: float = Field(300.0, gt=0, description="seconds per attempt for a whole non-streaming answer")
    connect_timeout: float = Field(5.0, gt=0)
    stream_idle_timeout: float = Field(60.0, gt=0, description="longest gap between streamed chunks")
    max_retries: int = Field(4, ge=0, description="retries after the first attempt (429, 5xx, connection errors)")
    backoff_initial: float = Field(0.2, ge=0, description="first backoff delay; doubles each retry, full jitter")
    backoff_max: float = Field(10.0, ge=0)
    max_concurrency: int = Field(256, gt=0, description="requests in flight from this process, all agents")
    max_connections: int | None = Field(None, gt=0, description="HTTP pool size; default max_concurrency + 16")
    default_max_tokens: int = Field(1024, gt=0, description="sent when a call gives none (vLLM's chat default "
                                                            "is the whole remaining context)")
    backpressure: bool = Field(False, description="hold new requests while vllm:num_requests_waiting is high")
    max_waiting: int = Field(64, ge=0, description="back-pressure threshold on the server's waiting queue")
    metrics_interval: float = Field(0.5, gt=0, description="seconds between /metrics scrapes")
    structured_output: Literal["response_format", "structured_outputs"] = Field(
        "response_format",
        description="request field for JSON-schema output: response_format works on every vLLM version; "
                    "structured_outputs needs vLLM >= 0.10.2",
    )

    max_response_bytes: int = Field(
        16 * 1024 * 1024, gt=0,
        description="the largest answer read from the server (a stream: the longest line); past it the call fails "
                    "with BadCompletion instead of holding whatever a broken or hostile server sends")
    http: Literal["auto", "aiohttp", "httpx"] = Field(
        "auto",
        description="HTTP client for completions: aiohttp costs about a third of httpx's CPU a call; auto = "
                    "aiohttp when it is installed (the 'fast' extra), else httpx. Streams, /v1/models, "
                    "/metrics and /tokenize always use httpx",
    )

    @field_validator("url")
    @classmethod
    def _strip_url(cls, value: str) -> str:
        return value.rstrip("/").removesuffix("/v1")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
        """Read ``ORCH_LLM_URL``, ``ORCH_LLM_MODEL``, ``ORCH_LLM_API_KEY`` (and timeout/retry/concurrency)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {field: env[name] for name, field in _ENV.items() if env.get(name)}
        values.update(overrides)
        return cls.model_validate(values)
