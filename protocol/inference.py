"""``InferenceClient``: the one client per process through which every agent calls the language model.

Built for vLLM, and works with any OpenAI-compatible server (llama.cpp's ``llama-server``, a
gateway): only ``/v1/models`` and ``/v1/chat/completions`` are required; vLLM's ``/health`` and
``/metrics`` are used when the server has them.

- A connection pool sized for hundreds of concurrent calls (aiohttp for completions when it is
  installed, httpx otherwise and for streams), and an ``anyio.CapacityLimiter`` shared by all agents
  in the process.
- Retries with exponential backoff and full jitter on connection errors, timeouts, 429, 5xx
  and unreadable bodies; never on other 4xx. A 400 about the context length raises
  ``ContextLengthExceeded``.
- JSON-schema output is requested with ``response_format={"type": "json_schema", ...}``: vLLM maps
  it onto its structured-outputs engine on every version, and OpenAI-compatible gateways understand
  it. ``structured_outputs={"json": schema}`` (vLLM >= 0.10.2) is available by setting; the legacy
  ``guided_json`` is never sent, because vLLM >= 0.12 ignores it silently and answers unconstrained.
- Token usage is recorded per (run_id, task_id) in a ``UsageLedger``.
- Optional back-pressure: new requests wait while ``vllm:num_requests_waiting`` is over a threshold.
"""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import math
import random
import ssl
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol, Self

import anyio
import httpx
import jsonschema
import structlog

from ._sse import EventTooLarge, iter_sse_data
from .errors import BadCompletion, ContextLengthExceeded, InferenceError, InferenceTimeout, InferenceUnavailable
from .inference_settings import InferenceSettings
from .tracing import Tracing, end
from .usage import Usage, UsageLedger

__all__ = ("ChatResult", "InferenceClient", "InferenceObserver", "InferenceSettings", "ModelInfo", "ServerLoad",
           "StreamEvent")

log = structlog.get_logger(__name__)

Messages = Sequence[Mapping[str, Any]]

_SHARD_CONNECTIONS = 1  # connections a pooled client is sized for (see __asynccontextmanager__)
_CONTEXT_MARKERS = (
    "maximum context length", "cannot be greater than max_model_len",  # vLLM
    "exceeds the available context size", "larger than the max context size",  # llama.cpp's llama-server
)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What ``check()`` found: the model to call and its context window."""

    model: str
    max_model_len: int | None
    served: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ChatResult:
    """One completion: its text, why it stopped, its usage, and the parsed JSON for schema calls."""

    text: str
    finish_reason: str | None
    usage: Usage
    model: str = ""
    id: str = ""
    data: Any = None


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """A streamed text delta; the last event has ``text=""``, the usage and the finish reason."""

    text: str
    usage: Usage | None = None
    finish_reason: str | None = None


@dataclass(frozen=True, slots=True)
class ServerLoad:
    """Queue gauges scraped from ``/metrics``."""

    running: float
    waiting: float
    kv_cache_usage: float


class InferenceObserver(Protocol):
    """Told about every request the client makes (``protocol.metrics.InferenceMetrics`` is one); must be cheap."""

    def request_finished(self, endpoint: str, status: int | None, outcome: str, duration_s: float) -> None:
        """One try at ``endpoint`` ended: HTTP ``status`` (None: no response) and ``outcome``
        (``ok``, ``error``, ``timeout``, ``unavailable``)."""

    def request_retried(self, error: Exception) -> None:
        """A failed try will be tried again after a backoff."""

    def usage_recorded(self, usage: Usage) -> None:
        """A completion's token usage."""


class _StreamTry:
    """One streamed try as the observer counts it: from the request to the last chunk or the failure."""

    def __init__(self, observer: InferenceObserver | None) -> None:
        self.observer = observer
        self.began = time.monotonic()
        self.status: int | None = None
        self.ended = False

    def end(self, outcome: str) -> None:
        """Report the try once, however many handlers see it end."""
        if not self.ended and self.observer is not None:
            self.observer.request_finished("/v1/chat/completions", self.status, outcome,
                                           time.monotonic() - self.began)
        self.ended = True


class _Retry(Exception):
    """An attempt failed in a way worth retrying; ``error`` is what to raise when retries run out."""

    def __init__(self, error: InferenceError, retry_after: float | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.retry_after = retry_after


@dataclass
class _LoadCache:
    load: ServerLoad | None = None
    at: float = 0.0
    lock: anyio.Lock = field(default_factory=anyio.Lock)


class InferenceClient(anyio.AsyncContextManagerMixin):
    """Async client for vLLM's (or any) OpenAI-compatible API; share one per process.

    ``async with InferenceClient(InferenceSettings.from_env()) as llm: await llm.check()``
    """

    def __init__(
        self,
        settings: InferenceSettings | None = None,
        *,
        ledger: UsageLedger | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        observer: InferenceObserver | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings or InferenceSettings()
        self.usage = ledger or UsageLedger()
        self.observer = observer
        self.tracing = tracing or Tracing.detect()
        self.limiter = anyio.CapacityLimiter(self.settings.max_concurrency)
        self._transport = transport
        self._shards: list[httpx.AsyncClient | None] = []
        self._next_shard: Iterator[int] = iter(())
        self._new_shard: Callable[[], httpx.AsyncClient] = httpx.AsyncClient
        self._model = self.settings.model
        self._posts: _AiohttpPoster | None = None
        self._load = _LoadCache()
        self._rng = random.Random()

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Self]:
        s = self.settings
        pool = s.max_connections or s.max_concurrency + 16
        # httpcore scans its whole pool on every request event (O(connections) each, and each look at a
        # connection asks the socket whether it is readable): milliseconds of CPU per call at hundreds of
        # connections. A client per connection keeps that scan to one or two; the slack below lets a
        # client that round-robin hands a second call before its first is done open a second connection.
        n_shards = max(1, math.ceil(pool / _SHARD_CONNECTIONS))
        per_shard = math.ceil(pool / n_shards) + 4  # slack for round-robin imbalance
        # one TLS context for all shards (each default one costs ~17 ms of CPU to load certificates)
        verify: ssl.SSLContext | bool = ssl.create_default_context() if s.url.startswith("https:") else False
        headers = {"user-agent": "orchestrator-inference"}
        if s.api_key is not None:
            headers["authorization"] = f"Bearer {s.api_key.get_secret_value()}"
        def new_shard() -> httpx.AsyncClient:
            return httpx.AsyncClient(
                base_url=s.url,
                headers=headers,
                # httpx's defaults (100 connections, 5 s timeout) would throttle hundreds of agents
                limits=httpx.Limits(max_connections=per_shard, max_keepalive_connections=per_shard),
                timeout=httpx.Timeout(s.timeout, connect=s.connect_timeout, pool=None),
                transport=self._transport,
                verify=verify,
            )

        async with AsyncExitStack() as stack:
            # Made on first use (~0.2 ms of CPU each): with aiohttp carrying the completions, a process may
            # only ever need the one that answers check().
            self._shards = [None] * n_shards
            self._next_shard = itertools.cycle(range(n_shards))
            self._new_shard = new_shard
            stack.push_async_callback(self._close_shards)
            if _use_aiohttp(s, self._transport):
                self._posts = await stack.enter_async_context(_AiohttpPoster(s, headers, pool, verify))
            try:
                yield self
            finally:
                self._posts = None

    async def _close_shards(self) -> None:
        shards, self._shards = self._shards, []
        for shard in shards:
            if shard is not None:
                await shard.aclose()

    @property
    def model(self) -> str:
        """The model name requests carry (known after ``check()`` when settings give none)."""
        return self._model or ""

    @property
    def http(self) -> httpx.AsyncClient:
        """A pooled HTTP client to the server (inside ``async with`` only); successive calls rotate shards."""
        if not self._shards:
            raise InferenceError("InferenceClient is not open; use `async with InferenceClient(...)`")
        index = next(self._next_shard)
        shard = self._shards[index]
        if shard is None:
            shard = self._shards[index] = self._new_shard()
        return shard

    # -- startup ----------------------------------------------------------------------------------

    async def check(self) -> ModelInfo:
        """Fail fast: raise ``InferenceUnavailable`` unless the server is healthy and serves the model.

        vLLM (and llama.cpp's ``llama-server``) answer ``GET /health``; 200 there means the engine is
        up, anything from 500 on means it is not. A server without that endpoint (404 or 405: many
        OpenAI-compatible servers and gateways) is judged by ``GET /v1/models`` alone.
        """
        url = self.settings.url
        try:
            health = await self._fetch("GET", "/health", timeout=self.settings.connect_timeout + 5)
        except httpx.HTTPError as exc:
            raise InferenceUnavailable(f"cannot reach the LLM server at {url!r}: {exc!r}") from exc
        except _TooLarge as exc:
            raise InferenceUnavailable(f"GET {url}/health answered {exc}: not an LLM server") from None
        if health.status_code >= 500:
            raise InferenceUnavailable(f"LLM server at {url!r} is unhealthy: GET /health -> {health.status_code}")
        has_health = health.status_code == 200  # 401/403 from a gateway: /v1/models below names the key problem
        try:
            resp = await self._fetch("GET", "/v1/models", timeout=self.settings.connect_timeout + 5)
        except httpx.HTTPError as exc:
            raise InferenceUnavailable(f"cannot list models at {url!r}: {exc!r}") from exc
        except _TooLarge as exc:
            raise InferenceUnavailable(f"GET {url}/v1/models answered {exc}: not an OpenAI model list") from None
        if resp.status_code == 401:
            raise InferenceUnavailable(f"LLM server at {url!r} rejected the API key (set ORCH_LLM_API_KEY)")
        if resp.status_code != 200:
            raise InferenceUnavailable(f"GET {url}/v1/models -> {resp.status_code}: {_error_message(resp)}")
        try:
            listed = resp.json().get("data", [])
        except (ValueError, AttributeError, RecursionError) as exc:
            raise InferenceUnavailable(f"GET {url}/v1/models did not answer an OpenAI model list: "
                                       f"{resp.text[:120]!r}") from exc
        data = [m for m in listed if isinstance(m, dict)] if isinstance(listed, list) else []
        served = tuple(str(m.get("id")) for m in data)
        if not served:
            raise InferenceUnavailable(f"LLM server at {url!r} serves no model")
        wanted = self.settings.model or served[0]
        if wanted not in served:
            raise InferenceUnavailable(f"LLM server at {url!r} does not serve model {wanted!r}; it serves {served!r}")
        self._model = wanted
        entry = next(m for m in data if m.get("id") == wanted)
        max_len = entry.get("max_model_len")  # vLLM's field; other servers may not say
        info = ModelInfo(wanted, max_len if isinstance(max_len, int) else None, served)
        log.info("inference_checked", url=url, model=wanted, max_model_len=info.max_model_len, health=has_health,
                 completions_over="aiohttp" if self._posts is not None else "httpx")
        return info

    # -- calls ------------------------------------------------------------------------------------

    async def chat(
        self,
        messages: Messages,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stop: str | Sequence[str] | None = None,
        json_schema: Mapping[str, Any] | None = None,
        schema_name: str = "output",
        run_id: str | None = None,
        task_id: str | None = None,
        ledger: UsageLedger | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> ChatResult:
        """One chat completion. With ``json_schema`` the answer is parsed, validated and put in ``data``.

        Raises:
            ContextLengthExceeded: the prompt plus max_tokens do not fit the model.
            BadCompletion: empty, cut off by max_tokens (with a schema), or not valid for the schema.
            InferenceTimeout / InferenceUnavailable / InferenceError: after retries.
        """
        body = self._chat_body(messages, max_tokens, temperature, stop, json_schema, schema_name, extra_body)
        payload = await self._post("/v1/chat/completions", body)
        try:
            choice = payload["choices"][0]
            text = choice["message"].get("content") or ""
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise BadCompletion(f"chat completion without a message: {str(payload)[:200]!r}") from exc
        result = self._result(payload, text, choice.get("finish_reason"), run_id, task_id, ledger)
        if json_schema is not None:
            return _with_json(result, json_schema, body["max_tokens"])
        return result

    async def chat_json(self, messages: Messages, schema: Mapping[str, Any], **kwargs: Any) -> Any:
        """Chat constrained to ``schema``; returns the validated JSON value."""
        result = await self.chat(messages, json_schema=schema, **kwargs)
        return result.data

    async def complete(
        self,
        prompt: str,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stop: str | Sequence[str] | None = None,
        run_id: str | None = None,
        task_id: str | None = None,
        ledger: UsageLedger | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> ChatResult:
        """One legacy text completion (/v1/completions)."""
        body: dict[str, Any] = {"model": self.model, "prompt": prompt,
                                "max_tokens": max_tokens or self.settings.default_max_tokens}
        _put(body, temperature=temperature, stop=stop)
        body.update(extra_body or {})
        payload = await self._post("/v1/completions", body)
        try:
            choice = payload["choices"][0]
            text = choice.get("text") or ""
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise BadCompletion(f"completion without text: {str(payload)[:200]!r}") from exc
        return self._result(payload, text, choice.get("finish_reason"), run_id, task_id, ledger)

    async def stream_chat(
        self,
        messages: Messages,
        *,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stop: str | Sequence[str] | None = None,
        run_id: str | None = None,
        task_id: str | None = None,
        ledger: UsageLedger | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """Stream text deltas; the final event carries usage. Retries only before the first delta.

        Close it early with ``contextlib.aclosing`` to release the connection and the limiter slot. With
        tracing on, the stream is one span (``llm /v1/chat/completions``, ``llm.stream``), a child of the
        span current when it started (a handler's), ended when the stream ends, fails or is closed.
        """
        body = self._chat_body(messages, max_tokens, temperature, stop, None, "", extra_body)
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
        # Started, not made current: a span made current in an async generator would leak into its caller
        # between deltas.
        span = self.tracing.start("llm /v1/chat/completions", parent=self.tracing.inject() or None, kind="client",
                                  attributes={"gen_ai.request.model": str(body.get("model", "")),
                                              "url.path": "/v1/chat/completions", "llm.stream": True})
        measured: dict[str, Any] = {}
        try:
            # Closed here, in this task, when the caller closes this generator: left to the event loop's
            # finalizer, the tries' limiter slot would be released from another task (an error), and late.
            async with contextlib.aclosing(self._stream(body, run_id, task_id, ledger, measured)) as events:
                async for event in events:
                    yield event
        except BaseException as exc:
            cancelled = isinstance(exc, GeneratorExit | anyio.get_cancelled_exc_class())
            end(span, error="" if cancelled else f"{type(exc).__name__}: {exc}",
                attributes={**measured, "llm.outcome": "cancelled" if cancelled else "error"})
            raise
        end(span, attributes={**measured, "llm.outcome": "ok"})

    async def _stream(self, body: dict[str, Any], run_id: str | None, task_id: str | None,
                      ledger: UsageLedger | None, span_outcome: dict[str, Any]) -> AsyncGenerator[StreamEvent]:
        """``stream_chat``'s tries; ``span_outcome`` gets the retries and the tokens for its span."""
        attempt = 0
        while True:
            started = False
            tried = _StreamTry(self.observer)
            outcome = "error"
            try:
                await self._wait_for_room()
                async with self.limiter, self.http.stream(
                    "POST", "/v1/chat/completions", json=body,
                    timeout=httpx.Timeout(self.settings.stream_idle_timeout, connect=self.settings.connect_timeout,
                                          pool=None),
                ) as resp:
                    status = tried.status = resp.status_code
                    if status != 200:
                        outcome = _outcome(status)
                        content = await _read_capped(resp.aiter_bytes(), self.settings.max_response_bytes,
                                                     resp.headers.get("content-length"))
                        _raise_for_status(_Answer(status, resp.headers, content))
                    usage: Usage | None = None
                    finish: str | None = None
                    done = False
                    async for data in iter_sse_data(resp.aiter_bytes(),
                                                    max_line_bytes=self.settings.max_response_bytes):
                        if data == "[DONE]":
                            done = True
                            break
                        chunk = _parse_json(data, "stream chunk")
                        if "error" in chunk:
                            error = InferenceError(f"stream failed: {_message_of(chunk)}")
                            raise error if started else _Retry(error)
                        for choice in chunk.get("choices") or ():
                            text = (choice.get("delta") or {}).get("content")
                            finish = choice.get("finish_reason") or finish
                            if text:
                                started = True
                                yield StreamEvent(text)
                        if chunk.get("usage"):
                            usage = Usage.from_openai(chunk["usage"])
                    if not done or finish is None:
                        error = BadCompletion("stream ended without finish_reason or [DONE]")
                        raise error if started else _Retry(error)
                    outcome = "ok"
                tried.end(outcome)
                usage = usage or Usage(requests=1)
                self._record_usage(usage, run_id, task_id, ledger)
                span_outcome.update({"llm.retries": attempt, "gen_ai.usage.input_tokens": usage.prompt_tokens,
                                     "gen_ai.usage.output_tokens": usage.completion_tokens})
                yield StreamEvent("", usage, finish)
                return
            except _Retry as retry:
                tried.end(outcome)
                if started:  # the caller already has part of the answer; a retry would repeat it
                    raise retry.error from retry
                attempt = await self._backoff(attempt, retry)
            except (_TooLarge, EventTooLarge) as exc:
                tried.end(outcome)
                raise BadCompletion(f"the stream from /v1/chat/completions is too large: {exc}") from None
            except BadCompletion as exc:
                tried.end(outcome)
                if started:
                    raise
                attempt = await self._backoff(attempt, _Retry(exc))
            except httpx.HTTPError as exc:
                timed_out = isinstance(exc, httpx.TimeoutException)
                tried.end("timeout" if timed_out else "unavailable")
                if started:
                    raise InferenceError(f"stream broke after output began: {exc!r}") from exc
                attempt = await self._backoff(attempt, _Retry(_transport_error(exc, self.settings.url)))
            except InferenceError:
                tried.end(outcome)
                raise
            except (GeneratorExit, anyio.get_cancelled_exc_class()):
                tried.end("cancelled")  # the caller stopped reading
                raise

    async def warm(self, messages: Messages) -> None:
        """Compute a shared prefix once (``max_tokens=1``) before fanning out many calls that share it.

        vLLM caches a block only after it is computed, so N calls sent together with a new prefix
        would each compute it; one warm-up call lets the other N hit the cache.
        """
        await self.chat(messages, max_tokens=1, run_id="_warmup")

    async def count_tokens(self, messages: Messages) -> int:
        """Prompt tokens of ``messages`` as the server counts them (POST /tokenize)."""
        try:
            resp = await self._fetch("POST", "/tokenize", json={"model": self.model, "messages": list(messages)})
        except _TooLarge as exc:
            raise BadCompletion(f"POST /tokenize answered {exc}") from None
        if resp.status_code != 200:
            _raise_for_status(resp)
        try:
            return int(resp.json()["count"])
        except (ValueError, TypeError, KeyError, RecursionError) as exc:
            raise BadCompletion(f"POST /tokenize did not answer a count: {resp.text[:120]!r}") from exc

    async def server_load(self) -> ServerLoad:
        """Scrape running/waiting/KV gauges from /metrics (both current and older names)."""
        try:
            resp = await self._fetch("GET", "/metrics", timeout=self.settings.connect_timeout + 5)
        except _TooLarge as exc:
            raise BadCompletion(f"GET /metrics answered {exc}") from None
        values: dict[str, float] = {}
        for line in resp.text.splitlines():
            if line.startswith("vllm:"):
                name, _, rest = line.partition("{")
                value = rest.rpartition("}")[2].strip() if rest else line.split()[-1]
                try:
                    values[name] = values.get(name, 0.0) + float(value)
                except ValueError:
                    continue
        return ServerLoad(
            running=values.get("vllm:num_requests_running", 0.0),
            waiting=values.get("vllm:num_requests_waiting", 0.0),
            kv_cache_usage=values.get("vllm:kv_cache_usage_perc", values.get("vllm:gpu_cache_usage_perc", 0.0)),
        )

    # -- internals --------------------------------------------------------------------------------

    async def _fetch(self, method: str, path: str, **kwargs: Any) -> _Answer:
        """A whole answer over httpx; _TooLarge past ``max_response_bytes``."""
        async with self.http.stream(method, path, **kwargs) as resp:
            content = await _read_capped(resp.aiter_bytes(), self.settings.max_response_bytes,
                                         resp.headers.get("content-length"))
            return _Answer(resp.status_code, resp.headers, content)

    def _chat_body(
        self,
        messages: Messages,
        max_tokens: int | None,
        temperature: float | None,
        stop: str | Sequence[str] | None,
        json_schema: Mapping[str, Any] | None,
        schema_name: str,
        extra_body: Mapping[str, Any] | None,
    ) -> dict[str, Any]:
        # always send max_tokens: vLLM's chat default is the whole remaining context
        body: dict[str, Any] = {"model": self.model, "messages": list(messages),
                                "max_tokens": max_tokens or self.settings.default_max_tokens}
        _put(body, temperature=temperature, stop=stop)
        if json_schema is not None:
            if self.settings.structured_output == "structured_outputs":
                body["structured_outputs"] = {"json": dict(json_schema)}
            else:
                body["response_format"] = {"type": "json_schema",
                                           "json_schema": {"name": schema_name, "schema": dict(json_schema),
                                                           "strict": True}}
        body.update(extra_body or {})
        return body

    def _record_usage(self, usage: Usage, run_id: str | None, task_id: str | None,
                      ledger: UsageLedger | None) -> None:
        (ledger or self.usage).record(usage, run_id=run_id, task_id=task_id)
        if self.observer is not None:
            self.observer.usage_recorded(usage)

    def _result(self, payload: Mapping[str, Any], text: str, finish: str | None, run_id: str | None,
                task_id: str | None, ledger: UsageLedger | None) -> ChatResult:
        usage = Usage.from_openai(payload.get("usage"))
        self._record_usage(usage, run_id, task_id, ledger)
        return ChatResult(text, finish, usage, str(payload.get("model", "")), str(payload.get("id", "")))

    async def _post(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        attempt = 0
        with self.tracing.span(f"llm {path}", kind="client",
                               attributes={"gen_ai.request.model": str(body.get("model", "")),
                                           "url.path": path}) as span:
            while True:
                try:
                    payload = await self._attempt(path, body)
                except _Retry as retry:
                    attempt = await self._backoff(attempt, retry)
                    continue
                if span is not None:
                    usage = payload.get("usage") or {}
                    span.set_attributes({"llm.retries": attempt,
                                         "gen_ai.usage.input_tokens": int(usage.get("prompt_tokens") or 0),
                                         "gen_ai.usage.output_tokens": int(usage.get("completion_tokens") or 0)})
                return payload

    async def _attempt(self, path: str, body: Mapping[str, Any]) -> dict[str, Any]:
        await self._wait_for_room()
        observer = self.observer
        started = time.monotonic()
        status: int | None = None
        outcome = "error"
        try:
            async with self.limiter:
                with anyio.fail_after(self.settings.timeout):
                    if self._posts is not None:
                        resp = await self._posts.post(path, body)
                    else:
                        resp = await self._fetch("POST", path, json=body)
            status = resp.status_code
            outcome = _outcome(status)
        except _TooLarge:
            raise BadCompletion(f"the answer from {path} is larger than max_response_bytes "
                                f"({self.settings.max_response_bytes} bytes)") from None
        except (httpx.HTTPError, _PostFailed) as exc:
            error = _transport_error(exc, self.settings.url)
            outcome = "timeout" if isinstance(error, InferenceTimeout) else "unavailable"
            raise _Retry(error) from exc
        except TimeoutError as exc:
            outcome = "timeout"
            raise _Retry(InferenceTimeout(f"no answer from {self.settings.url} in {self.settings.timeout} s")) from exc
        finally:
            if observer is not None:
                observer.request_finished(path, status, outcome, time.monotonic() - started)
        if resp.status_code != 200:
            _raise_for_status(resp)
        try:
            payload = resp.json()
        except (ValueError, RecursionError) as exc:  # nesting deep enough to exhaust the parser's stack too
            raise _Retry(BadCompletion(f"unreadable JSON from {path}: {resp.text[:120]!r}")) from exc
        if not isinstance(payload, dict):
            raise _Retry(BadCompletion(f"unexpected body from {path}: {resp.text[:120]!r}"))
        return payload

    async def _backoff(self, attempt: int, retry: _Retry) -> int:
        attempt += 1
        if attempt > self.settings.max_retries:
            log.warning("inference_retries_exhausted", attempts=attempt, error=str(retry.error))
            raise retry.error from retry
        if self.observer is not None:
            self.observer.request_retried(retry.error)
        cap = min(self.settings.backoff_max, self.settings.backoff_initial * 2 ** (attempt - 1))
        delay = self._rng.uniform(0, cap)  # full jitter: agents that failed together retry apart
        if retry.retry_after is not None:
            delay = max(delay, min(retry.retry_after, self.settings.backoff_max))
        log.info("inference_retried", attempt=attempt, delay_s=round(delay, 3), cap_s=cap, error=str(retry.error))
        await anyio.sleep(delay)
        return attempt

    async def _wait_for_room(self) -> None:
        """Back-pressure: wait while the server's waiting queue is over ``max_waiting``."""
        s = self.settings
        if not s.backpressure:
            return
        while True:
            load = await self._cached_load()
            if load is None or load.waiting <= s.max_waiting:
                return
            await anyio.sleep(s.metrics_interval * self._rng.uniform(0.5, 1.0))

    async def _cached_load(self) -> ServerLoad | None:
        cache = self._load
        if time.monotonic() - cache.at < self.settings.metrics_interval:
            return cache.load
        async with cache.lock:
            if time.monotonic() - cache.at >= self.settings.metrics_interval:  # single flight
                try:
                    cache.load = await self.server_load()
                except (httpx.HTTPError, BadCompletion):
                    cache.load = None  # no metrics is no reason to stop calling
                cache.at = time.monotonic()
        return cache.load


def _put(body: dict[str, Any], **values: Any) -> None:
    for key, value in values.items():
        if value is not None:
            body[key] = value if isinstance(value, str | int | float) else list(value)


def _with_json(result: ChatResult, schema: Mapping[str, Any], max_tokens: int) -> ChatResult:
    def bad(message: str) -> BadCompletion:
        return BadCompletion(message, finish_reason=result.finish_reason, tokens=result.usage.total_tokens,
                             text=result.text)

    if result.finish_reason == "length":
        raise bad(f"structured answer cut off by max_tokens={max_tokens} after {result.usage.completion_tokens} "
                  "tokens (finish_reason='length')")
    try:
        data = json.loads(result.text)
    except (ValueError, RecursionError) as exc:  # the model's text: as hostile as any input
        raise bad(f"structured answer is not valid JSON ({exc}): {result.text[:120]!r}") from exc
    try:
        jsonschema.validate(data, dict(schema))
    except jsonschema.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path) or "the top level"
        raise bad(f"structured answer does not match the schema at {where}: {exc.message}") from exc
    return ChatResult(result.text, result.finish_reason, result.usage, result.model, result.id, data)


def _parse_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _Retry(BadCompletion(f"{what} is not valid JSON: {text[:120]!r}")) from exc


def _message_of(body: Any) -> str:
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            return str(err.get("message", err))
        if isinstance(err, str):
            return err
        if "message" in body:
            return str(body["message"])
        if "detail" in body:
            return str(body["detail"])
    return str(body)[:300]


def _error_message(resp: httpx.Response | _Answer) -> str:
    try:
        return _message_of(resp.json())
    except (ValueError, RecursionError):
        return resp.text[:300]


def _retry_after(resp: httpx.Response | _Answer) -> float | None:
    try:
        return float(resp.headers["retry-after"])
    except (KeyError, ValueError):
        return None


def _outcome(status: int) -> str:
    """The observer's outcome for an HTTP answer: ``ok``, ``unavailable`` (retried) or ``error``."""
    if status == 200:
        return "ok"
    return "unavailable" if status == 429 or status >= 500 else "error"


def _raise_for_status(resp: httpx.Response | _Answer) -> None:
    status = resp.status_code
    message = _error_message(resp)
    if status == 429 or status >= 500:
        error: InferenceError = (InferenceUnavailable if status in (502, 503, 504) else InferenceError)(
            f"LLM server answered {status}: {message}")
        raise _Retry(error, _retry_after(resp))
    if status == 400 and any(marker in message for marker in _CONTEXT_MARKERS):
        raise ContextLengthExceeded(message)
    if status == 401:
        raise InferenceUnavailable("LLM server rejected the API key (401); set ORCH_LLM_API_KEY")
    if status == 404 and "model" in message.lower():
        raise InferenceUnavailable(f"LLM server does not serve the model: {message}")
    raise InferenceError(f"LLM server refused the request ({status}): {message}")


def _transport_error(exc: httpx.HTTPError | _PostFailed, url: str) -> InferenceError:
    if isinstance(exc, _PostFailed):  # aiohttp's own error says what happened
        timed_out, cause = exc.timeout, exc.__cause__
    else:
        timed_out, cause = isinstance(exc, httpx.TimeoutException), exc
    if timed_out:
        return InferenceTimeout(f"timed out talking to {url}: {cause!r}")
    return InferenceUnavailable(f"cannot talk to {url}: {cause!r}")


# -- completions over aiohttp ---------------------------------------------------------------------


class _Answer:
    """A whole HTTP answer read by aiohttp, with the parts of ``httpx.Response`` the client reads."""

    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status_code: int, headers: Mapping[str, str], content: bytes) -> None:
        self.status_code = status_code
        self.headers = headers
        self.content = content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.content)


class _TooLarge(Exception):
    """An answer longer than ``max_response_bytes``."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} bytes (max_response_bytes)")


async def _read_capped(chunks: AsyncIterator[bytes], limit: int, declared: str | None) -> bytes:
    """The whole body, or _TooLarge as soon as it says or shows it is longer than ``limit``."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge(limit)
    parts: list[bytes] = []
    size = 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise _TooLarge(limit)
        parts.append(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)


class _PostFailed(Exception):
    """aiohttp could not get an answer (its own error is the cause); ``timeout`` when it timed out."""

    def __init__(self, timeout: bool) -> None:
        super().__init__("timed out" if timeout else "transport error")
        self.timeout = timeout


def _env_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``HTTP_PROXY``/``HTTPS_PROXY``), or None (none, or ``NO_PROXY``)."""
    import urllib.parse
    import urllib.request  # ~10 ms to import, and needed only when aiohttp is

    parts = urllib.parse.urlsplit(url)
    if parts.hostname is None or urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme)


def _use_aiohttp(settings: InferenceSettings, transport: httpx.AsyncBaseTransport | None) -> bool:
    if settings.http == "httpx":
        return False
    if transport is not None:  # a test's (or a proxy's) httpx transport: keep every call on it
        if settings.http == "aiohttp":
            raise InferenceError("InferenceSettings(http='aiohttp') cannot use an httpx transport; use http='httpx'")
        return False
    if settings.http == "aiohttp":
        return True
    return importlib.util.find_spec("aiohttp") is not None


class _AiohttpPoster:
    """POSTs JSON and reads the whole answer with aiohttp: about a third of httpx's CPU a call at hundreds
    of concurrent calls (httpx's request and response models, and httpcore's pool, cost the rest)."""

    def __init__(self, s: InferenceSettings, headers: Mapping[str, str], pool: int,
                 verify: ssl.SSLContext | bool) -> None:
        self._settings, self._headers, self._pool, self._verify = s, dict(headers), pool, verify
        self._session: Any = None  # an aiohttp.ClientSession, and aiohttp.ClientError below, once open
        self._errors: tuple[type[Exception], ...] = ()
        self._proxy: str | None = None

    async def __aenter__(self) -> Self:
        try:
            import aiohttp
        except ImportError as exc:
            raise InferenceError("InferenceSettings(http='aiohttp') needs aiohttp: pip install "
                                 "'orchestrator[fast]', or set http='httpx'") from exc
        s = self._settings
        self._errors = (aiohttp.ClientError,)
        self._session = aiohttp.ClientSession(
            headers=self._headers,
            connector=aiohttp.TCPConnector(limit=self._pool, limit_per_host=0,
                                           ssl=self._verify if isinstance(self._verify, ssl.SSLContext) else True),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=s.connect_timeout, sock_read=s.timeout))
        # HTTP(S)_PROXY and NO_PROXY, as httpx honours them for the other calls, looked up once: aiohttp's
        # trust_env looks them (and ~/.netrc) up at every request, ~0.25 ms of CPU a call
        self._proxy = _env_proxy(s.url)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._session.close()

    async def post(self, path: str, body: Mapping[str, Any]) -> _Answer:
        try:
            async with self._session.post(self._settings.url + path, json=body, proxy=self._proxy) as resp:
                content = await _read_capped(resp.content.iter_any(), self._settings.max_response_bytes,
                                             resp.headers.get("Content-Length"))
                return _Answer(resp.status, resp.headers, content)
        except self._errors as exc:
            raise _PostFailed(isinstance(exc, TimeoutError)) from exc
