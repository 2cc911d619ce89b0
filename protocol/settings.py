"""Connection settings, read once at the edge (``api``/``cli``) and passed down explicitly.

``ORCH_*`` variables are read with ``env_value`` and a parser (``seconds``, ``count``, ``port``):
a value that does not parse is a ConfigError naming the variable and the value, never a bare
``ValueError``. ``setting_error`` does the same for a settings model built from several sources.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any, Self, TypeVar
from urllib.parse import urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from protocol.errors import ConfigError

__all__ = ("RedisSettings", "count", "env_value", "port", "redact_url", "seconds", "setting_error")

T = TypeVar("T")


def env_value(name: str, parse: Callable[[str], T], default: T, *, environ: Mapping[str, str] | None = None) -> T:
    """The environment variable ``name`` parsed, or ``default`` when it is unset or blank.

    Raises ConfigError naming the variable and its value when ``parse`` rejects it (``ValueError``).
    """
    raw = (os.environ if environ is None else environ).get(name, "")
    if not raw.strip():
        return default
    try:
        return parse(raw.strip())
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r}: {exc}") from exc


def seconds(text: str) -> float:
    """A duration in seconds, above 0."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError("expected a number of seconds above 0") from None
    if not value > 0 or math.isinf(value):
        raise ValueError("expected a number of seconds above 0")
    return value


def count(text: str) -> int:
    """A whole number, at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError("expected a whole number of at least 1") from None
    if value < 1:
        raise ValueError("expected a whole number of at least 1")
    return value


def port(text: str) -> int:
    """A TCP port number, 0 to 65535 (0: any free port)."""
    try:
        value = int(text)
    except ValueError:
        raise ValueError("expected a port number from 0 to 65535") from None
    if not 0 <= value <= 65535:
        raise ValueError("expected a port number from 0 to 65535")
    return value


def setting_error(exc: ValidationError, sources: Mapping[str, str]) -> ConfigError:
    """A ConfigError for the first invalid field of a settings model, naming where its value came from.

    ``sources`` maps a field name to what set it, as the user wrote it: ``"--redis"`` or
    ``"ORCH_NAMESPACE='a:b'"``.
    """
    err = exc.errors()[0]
    field = str(err["loc"][0]) if err["loc"] else ""
    where = sources.get(field, field or "settings")
    return ConfigError(f"{where}: {err['msg'].removeprefix('Value error, ')}")


def redact_url(url: str) -> str:
    """``url`` with any password replaced by ``***``, fit for logs and error messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


class RedisSettings(BaseModel):
    """How :class:`~protocol.redis_bus.RedisBus` reaches Redis and maps names to keys.

    ``url`` accepts ``redis://[user:password@]host:port/db`` and ``rediss://`` (TLS; the usual
    redis-py query options such as ``ssl_cert_reqs`` and ``ssl_ca_certs`` apply).
    """

    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)  # URLs carry passwords

    url: str = "redis://127.0.0.1:6379/0"
    namespace: str = Field(default="orch", min_length=1)
    # Every operation retries connection errors with capped, jittered exponential backoff. Once
    # Redis has been unreachable this long (one continuous outage, from the first failed call
    # since the last successful one) calls raise BusUnavailable; None retries for as long as
    # the outage lasts (the manager and worker processes, unless --exit-after-s is given).
    retry_budget_s: float | None = Field(default=30.0, ge=0)
    backoff_base_s: float = Field(default=0.05, gt=0)
    backoff_cap_s: float = Field(default=2.0, gt=0)
    connect_timeout_s: float = Field(default=2.0, gt=0)
    # Socket read timeout on top of the blocking read time (XREADGROUP BLOCK holds the socket).
    socket_timeout_s: float = Field(default=10.0, gt=0)
    # Most entries a consumer takes per read (XREADGROUP COUNT, and per reclaim). The actual
    # count adapts: 1 while the caller is slow, doubling while it drains batches quickly.
    # Entries buffered for half a lease without being yielded are handed back at once.
    read_count: int = Field(default=32, ge=1)
    reclaim_count: int = Field(default=32, ge=1)
    # Before a read of a results stream that may block, a consumer (the manager) waits up to this long
    # while its bus has writes in flight (assigns, acknowledgements), unless its last read came back
    # full, so that replies arriving meanwhile come in one read instead of a read (and a wake-up) each;
    # 0 reads at once. Reads of tasks streams never wait.
    results_read_after_writes_s: float = Field(default=0.005, ge=0)
    # Back-pressure: when set, ``publish`` to a ``tasks.*`` stream waits while the stream holds
    # this many entries (waiting plus in flight, since acknowledged entries are deleted).
    max_task_stream_len: int | None = Field(default=None, ge=1)
    backpressure_poll_s: float = Field(default=0.05, gt=0)
    dead_letter_maxlen: int = Field(default=100_000, ge=1)
    # A stored value longer than this (a big run's status summary: 25 MB at 100,000 tasks) is written a
    # piece of this size at a time, so neither the client nor the socket buffers hold copies of all of it.
    value_piece_bytes: int = Field(default=1 << 20, ge=1024)
    max_connections: int | None = Field(default=None, ge=1)

    @field_validator("namespace")
    @classmethod
    def _no_braces(cls, value: str) -> str:
        if any(c in value for c in "{}: "):
            raise ValueError(f"namespace {value!r} must not contain braces, colons or spaces")
        return value

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"URL {redact_url(value)!r} must start with redis://, rediss:// or unix://")
        return value

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> Self:
        """Settings for ``url``, with keyword overrides of any other field."""
        return cls(url=url, **overrides)

    @property
    def safe_url(self) -> str:
        """The URL with its password redacted."""
        return redact_url(self.url)
