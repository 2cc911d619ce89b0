"""A real small model behind a real OpenAI-compatible server, for tests and benchmarks.

``scripts/real-model`` builds llama.cpp's ``llama-server`` and unpacks SmolLM2-135M-Instruct
(GGUF) into a cache outside the repository. ``RealModel.find()`` locates that cache (or says why
it cannot), and ``LlamaServer`` runs the server on a free loopback port for as long as a ``with``
block lasts:

```python
with LlamaServer(RealModel.find()) as server:
    async with InferenceClient(server.settings()) as client:
        ...
```
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from protocol.errors import InferenceUnavailable
from protocol.inference_settings import InferenceSettings

__all__ = ("DEFAULT_CACHE", "LlamaServer", "RealModel", "RealModelUnavailable")

DEFAULT_CACHE = Path.home() / ".cache" / "orchestrator" / "real-model"
MODEL_ALIAS = "smollm2"


class RealModelUnavailable(InferenceUnavailable):
    """The real-model cache is missing or its server does not start; the message says which and what to do."""


@dataclass(frozen=True, slots=True)
class RealModel:
    """The cached ``llama-server`` binary and GGUF model."""

    server: Path
    model: Path

    @classmethod
    def find(cls, environ: Mapping[str, str] | None = None) -> RealModel:
        """The cache at ``ORCH_REAL_MODEL_CACHE`` (default ``~/.cache/orchestrator/real-model``)."""
        env = os.environ if environ is None else environ
        cache = Path(env["ORCH_REAL_MODEL_CACHE"]) if env.get("ORCH_REAL_MODEL_CACHE") else DEFAULT_CACHE
        found = cls(cache / "bin" / "llama-server", cache / "model.gguf")
        missing = [str(p) for p in (found.server, found.model) if not p.is_file()]
        if missing:
            raise RealModelUnavailable(f"no real-model cache ({', '.join(missing)} missing): run scripts/real-model "
                                       "to build llama-server and unpack SmolLM2-135M (about 10 minutes, once)")
        return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LlamaServer:
    """``llama-server`` on 127.0.0.1, started on entry and stopped (by its pid) on exit.

    ``context`` is the whole KV cache, shared by ``parallel`` slots (each slot gets
    ``context // parallel`` tokens); ``threads`` caps the CPU it uses.
    """

    real: RealModel
    context: int = 2048
    parallel: int = 1
    threads: int = 2
    port: int = field(default_factory=_free_port)
    startup_timeout: float = 60.0
    extra_args: tuple[str, ...] = ()
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The server's base URL."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def model(self) -> str:
        """The model name the server answers to."""
        return MODEL_ALIAS

    def settings(self, **overrides: Any) -> InferenceSettings:
        """Client settings for this server: generous timeouts (CPU inference), quick backoff."""
        values: dict[str, Any] = {"url": self.url, "model": self.model, "timeout": 120.0, "backoff_initial": 0.05,
                                  "backoff_max": 0.5}
        values.update(overrides)
        return InferenceSettings.model_validate(values)

    def __enter__(self) -> Self:
        args = [str(self.real.server), "-m", str(self.real.model), "--alias", MODEL_ALIAS, "--host", "127.0.0.1",
                "--port", str(self.port), "-c", str(self.context), "-np", str(self.parallel),
                "-t", str(self.threads), "-tb", str(self.threads), *self.extra_args]
        log = self.log_path.open("wb") if self.log_path is not None else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise RealModelUnavailable(f"cannot start {self.real.server}: {exc}") from exc
        finally:
            if not isinstance(log, int):
                log.close()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def stop(self) -> None:
        """Terminate the server (kill it if it lingers)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _wait_ready(self) -> None:
        """Poll /health until 200 (it answers 503 while the model loads)."""
        deadline = time.monotonic() + self.startup_timeout
        assert self.proc is not None
        while time.monotonic() < deadline:
            code = self.proc.poll()
            if code is not None:
                where = f"; see {self.log_path}" if self.log_path else ""
                raise RealModelUnavailable(f"llama-server exited with status {code} before it was ready "
                                           f"(a cache built for another CPU? rerun scripts/real-model){where}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            time.sleep(0.2)
        raise RealModelUnavailable(f"llama-server on port {self.port} was not ready within {self.startup_timeout} s")
