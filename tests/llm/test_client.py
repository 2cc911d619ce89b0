"""InferenceClient against the simulator over real HTTP (nothing patched), with each of its HTTP clients."""

from __future__ import annotations

import json
import logging
import socket
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from typing import Any

import anyio
import anyio.abc
import httpx
import pytest
import structlog
import structlog.testing

from orchestrator.simulator import RulesPolicy, SimConfig, SimulatedVLLM
from protocol.errors import (
    BadCompletion,
    ContextLengthExceeded,
    InferenceError,
    InferenceTimeout,
    InferenceUnavailable,
)
from protocol.inference import InferenceClient, InferenceSettings
from protocol.prompts import build_messages
from protocol.usage import UsageLedger

HELLO = [{"role": "user", "content": "Say hello"}]
_HTTP = {"client": "auto"}  # the HTTP client of this test's settings (the ``http_client`` fixture sets it)


@pytest.fixture(autouse=True, params=["aiohttp", "httpx"])
def http_client(request: pytest.FixtureRequest) -> str:
    """Every test here runs with completions over aiohttp and over httpx."""
    _HTTP["client"] = request.param
    return str(request.param)


@pytest.fixture
def inference_settings(sim_llm: SimulatedVLLM, http_client: str) -> InferenceSettings:
    return fast(sim_llm, timeout=10.0, backoff_max=0.1)


def fast(sim: SimulatedVLLM, **overrides: object) -> InferenceSettings:
    values: dict[str, object] = {"url": sim.url, "model": sim.model, "timeout": 5.0, "backoff_initial": 0.01,
                                 "backoff_max": 0.05, "http": _HTTP["client"]}
    values.update(overrides)
    return InferenceSettings.model_validate(values)


async def test_chat_returns_text_and_usage(inference_client: InferenceClient) -> None:
    result = await inference_client.chat(HELLO, max_tokens=50)
    assert result.text
    assert result.finish_reason == "stop"
    assert result.usage.prompt_tokens > 0
    assert result.usage.completion_tokens > 0


async def test_retries_5xx_then_succeeds(sim_llm: SimulatedVLLM, inference_client: InferenceClient) -> None:
    sim_llm.script_faults(["server_error", "unavailable", "rate_limited"])
    result = await inference_client.chat(HELLO)
    assert result.text
    assert sim_llm.stats.requests_by_status[500] == 1
    assert sim_llm.stats.requests_by_status[503] == 1
    assert sim_llm.stats.requests_by_status[429] == 1
    assert sim_llm.stats.requests_by_status[200] == 1


async def test_gives_up_after_max_retries(sim_llm: SimulatedVLLM) -> None:
    sim_llm.script_faults(["server_error"] * 3)
    async with InferenceClient(fast(sim_llm, max_retries=2)) as client:
        with pytest.raises(InferenceError, match="500"):
            await client.chat(HELLO)
    assert sim_llm.stats.requests_by_status[500] == 3


async def test_backoff_grows_between_retries(sim_llm: SimulatedVLLM) -> None:
    sim_llm.script_faults(["server_error"] * 4)
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))  # other tests set WARNING
    try:
        async with InferenceClient(fast(sim_llm, max_retries=4, backoff_initial=0.05, backoff_max=0.3)) as client:
            with structlog.testing.capture_logs() as logs:
                await client.chat(HELLO)
    finally:
        structlog.configure(**saved)
    retries = [entry for entry in logs if entry["event"] == "inference_retried"]
    # Full jitter: the k-th delay is uniform in [0, cap], the cap doubles per retry up to backoff_max.
    assert [entry["cap_s"] for entry in retries] == [0.05, 0.1, 0.2, 0.3]
    assert all(0 <= entry["delay_s"] <= entry["cap_s"] for entry in retries)


async def test_no_retry_on_400(sim_llm: SimulatedVLLM, inference_client: InferenceClient) -> None:
    with pytest.raises(InferenceError, match="400"):
        await inference_client.chat(HELLO, extra_body={"stream_options": {"include_usage": True}})
    assert sim_llm.stats.requests_by_status[400] == 1
    assert sum(sim_llm.stats.requests_by_status.values()) == 1


async def test_context_length_exceeded(sim_llm: SimulatedVLLM, inference_client: InferenceClient) -> None:
    long = [{"role": "user", "content": "word " * 10_000}]
    with pytest.raises(ContextLengthExceeded, match="maximum context length"):
        await inference_client.chat(long)
    with pytest.raises(ContextLengthExceeded):
        await inference_client.chat(HELLO, max_tokens=sim_llm.config.max_model_len + 1)  # vLLM 0.33 clamps up to it
    assert sim_llm.stats.requests_by_status[400] == 2


async def test_timeout_when_server_hangs(sim_llm: SimulatedVLLM) -> None:
    sim_llm.script_faults(["hang", "hang"])
    async with InferenceClient(fast(sim_llm, timeout=0.3, max_retries=1)) as client:
        with pytest.raises(InferenceTimeout):
            await client.chat(HELLO)


async def test_hang_then_success(sim_llm: SimulatedVLLM) -> None:
    sim_llm.script_faults(["hang"])
    async with InferenceClient(fast(sim_llm, timeout=0.3)) as client:
        assert (await client.chat(HELLO)).text


async def test_malformed_and_truncated_bodies_are_retried(sim_llm: SimulatedVLLM,
                                                          inference_client: InferenceClient) -> None:
    sim_llm.script_faults(["malformed", "truncate"])
    assert (await inference_client.chat(HELLO)).text
    assert sim_llm.stats.requests_by_status[200] == 3


async def test_structured_output(inference_client: InferenceClient) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}, "score": {"type": "integer"}},
              "required": ["answer", "score"], "additionalProperties": False}
    data = await inference_client.chat_json(HELLO, schema)
    assert set(data) == {"answer", "score"}
    assert isinstance(data["score"], int)


async def test_structured_output_via_structured_outputs_field(sim_llm: SimulatedVLLM) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    async with InferenceClient(fast(sim_llm, structured_output="structured_outputs")) as client:
        assert await client.chat_json(HELLO, schema) == {"ok": False}


async def test_structured_answer_cut_off_is_bad_completion(inference_client: InferenceClient) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string", "minLength": 200}},
              "required": ["answer"]}
    with pytest.raises(BadCompletion, match="length"):
        await inference_client.chat(HELLO, json_schema=schema, max_tokens=3)


async def test_streaming_yields_deltas_then_usage(inference_client: InferenceClient) -> None:
    events = [e async for e in inference_client.stream_chat(HELLO)]
    text = "".join(e.text for e in events)
    assert len(events) > 3
    assert text.startswith("Simulated answer")
    final = events[-1]
    assert final.finish_reason == "stop"
    assert final.usage is not None
    assert final.usage.completion_tokens > 0


async def test_streaming_retries_before_first_delta(sim_llm: SimulatedVLLM,
                                                    inference_client: InferenceClient) -> None:
    sim_llm.script_faults(["server_error"])
    events = [e async for e in inference_client.stream_chat(HELLO)]
    assert events[-1].usage is not None


async def test_streaming_error_after_output_raises(sim_llm: SimulatedVLLM,
                                                   inference_client: InferenceClient) -> None:
    sim_llm.script_faults(["mid_stream_error"])

    async def drain() -> None:
        async with aclosing(inference_client.stream_chat(HELLO)) as stream:
            async for _ in stream:
                pass

    with pytest.raises(InferenceError, match="stream"):
        await drain()


async def test_usage_accounted_per_task_and_run(inference_client: InferenceClient) -> None:
    ledger = UsageLedger()
    a = await inference_client.chat(HELLO, run_id="r1", task_id="t1", ledger=ledger)
    b = await inference_client.chat(HELLO, run_id="r1", task_id="t2", ledger=ledger)
    c = await inference_client.complete("Once upon", run_id="r2", task_id="t1", ledger=ledger)
    events = [e async for e in inference_client.stream_chat(HELLO, run_id="r1", task_id="t1", ledger=ledger)]
    streamed = events[-1].usage
    assert streamed is not None
    assert ledger.task("r1", "t1") == a.usage + streamed
    assert ledger.run("r1") == a.usage + b.usage + streamed
    assert ledger.run("r2") == c.usage
    assert ledger.total.requests == 4
    assert set(ledger.tasks("r1")) == {"t1", "t2"}
    assert inference_client.usage.total.requests == 0  # an explicit ledger replaces the client's own


async def test_check_finds_model(sim_llm: SimulatedVLLM) -> None:
    async with InferenceClient(fast(sim_llm, model=None)) as client:
        info = await client.check()
        assert info.model == sim_llm.model
        assert info.max_model_len == sim_llm.config.max_model_len
        assert client.model == sim_llm.model


async def test_check_unreachable() -> None:
    async with InferenceClient(InferenceSettings(url="http://127.0.0.1:9", connect_timeout=0.5)) as client:
        with pytest.raises(InferenceUnavailable, match="cannot reach"):
            await client.check()


async def test_check_wrong_model(sim_llm: SimulatedVLLM) -> None:
    async with InferenceClient(fast(sim_llm, model="other")) as client:
        with pytest.raises(InferenceUnavailable, match="does not serve model 'other'"):
            await client.check()


async def test_check_engine_dead(sim_llm: SimulatedVLLM) -> None:
    sim_llm.kill_engine()
    async with InferenceClient(fast(sim_llm)) as client:
        with pytest.raises(InferenceUnavailable, match="unhealthy"):
            await client.check()


async def test_wrong_api_key() -> None:
    async with SimulatedVLLM(SimConfig(time_scale=0.005, api_keys=("secret",))) as sim:
        async with InferenceClient(fast(sim, api_key="wrong")) as client:
            with pytest.raises(InferenceUnavailable, match="API key"):
                await client.check()
            with pytest.raises(InferenceUnavailable, match="API key"):
                await client.chat(HELLO)
        async with InferenceClient(fast(sim, api_key="secret")) as client:
            await client.check()
            assert (await client.chat(HELLO)).text


async def test_unknown_model_is_not_retried(sim_llm: SimulatedVLLM) -> None:
    async with InferenceClient(fast(sim_llm, model="nope")) as client:
        with pytest.raises(InferenceUnavailable, match="does not exist"):
            await client.chat(HELLO)
    assert sim_llm.stats.requests_by_status[404] == 1


async def test_concurrency_limit_caps_batch(sim_llm: SimulatedVLLM) -> None:
    async with InferenceClient(fast(sim_llm, max_concurrency=8)) as client, anyio.create_task_group() as tg:
        for _ in range(40):
            tg.start_soon(client.chat, HELLO)
    assert sim_llm.stats.completed == 40
    assert sim_llm.stats.max_batch_size <= 8


async def test_backpressure_reads_queue_depth(sim_llm: SimulatedVLLM) -> None:
    async with InferenceClient(fast(sim_llm, backpressure=True, max_waiting=0, metrics_interval=0.02)) as client:
        load = await client.server_load()
        assert load.waiting == 0
        async with anyio.create_task_group() as tg:
            for _ in range(20):
                tg.start_soon(client.chat, HELLO)
    assert sim_llm.stats.completed == 20


async def test_count_tokens_matches_usage(inference_client: InferenceClient) -> None:
    n = await inference_client.count_tokens(HELLO)
    result = await inference_client.chat(HELLO)
    assert n == result.usage.prompt_tokens


@pytest.mark.parametrize("sim_config", [SimConfig(time_scale=0.005, enable_prompt_tokens_details=True)])
async def test_shared_prefix_layout_hits_cache(sim_llm: SimulatedVLLM, inference_client: InferenceClient) -> None:
    system = "You are a careful worker in a multi-agent system. " * 20
    spec = {"description": "Answer in three numbered points.", "max_words": 120}
    for i in range(6):
        messages = build_messages(system=system, role="[role: worker]", spec=spec, variable=f"Instruction: task {i}")
        await inference_client.chat(messages, max_tokens=40)
    assert sim_llm.stats.cache_hit_rate > 0.6
    assert inference_client.usage.total.cached_tokens > 0


def test_settings_from_env() -> None:
    env = {"ORCH_LLM_URL": "http://gpu:8000/v1/", "ORCH_LLM_MODEL": "m", "ORCH_LLM_API_KEY": "k",
           "ORCH_LLM_MAX_CONCURRENCY": "300", "ORCH_LLM_HTTP": "httpx"}
    s = InferenceSettings.from_env(env, timeout=7)
    assert s.url == "http://gpu:8000"
    assert s.model == "m"
    assert s.api_key is not None
    assert s.api_key.get_secret_value() == "k"
    assert s.max_concurrency == 300
    assert s.timeout == 7
    assert s.http == "httpx"
    with pytest.raises(ValueError, match="http"):
        InferenceSettings.from_env({"ORCH_LLM_HTTP": "curl"})


async def test_rules_policy_answers() -> None:
    policy = RulesPolicy([(r"capital of (\w+)", lambda req, m: f"The capital of {m.group(1)} is X.")])
    async with SimulatedVLLM(SimConfig(time_scale=0.005), policy=policy) as sim, InferenceClient(fast(sim)) as client:
        r = await client.chat([{"role": "user", "content": "What is the capital of Peru?"}])
    assert r.text == "The capital of Peru is X."


def _openai_only(health_status: int) -> httpx.MockTransport:
    """An OpenAI-compatible server with no vLLM extras: /health answers ``health_status``."""

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(health_status)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"object": "list", "data": [{"id": "small", "object": "model"}]})
        return httpx.Response(404, json={"detail": "Not Found"})

    return httpx.MockTransport(handle)


@pytest.mark.parametrize("status", [404, 405])
async def test_check_accepts_a_server_without_health(status: int) -> None:
    async with InferenceClient(InferenceSettings(url="http://llm.test"), transport=_openai_only(status)) as client:
        info = await client.check()
    assert info.model == "small"
    assert info.max_model_len is None


async def test_check_refuses_a_server_whose_health_says_down() -> None:
    async with InferenceClient(InferenceSettings(url="http://llm.test"), transport=_openai_only(503)) as client:
        with pytest.raises(InferenceUnavailable, match="unhealthy"):
            await client.check()


async def test_llama_cpp_context_error_is_context_length_exceeded() -> None:
    body = {"error": {"code": 400, "type": "exceed_context_size_error",
                      "message": "request (2600 tokens) exceeds the available context size (2048 tokens), "
                                 "try increasing it"}}
    transport = httpx.MockTransport(lambda request: httpx.Response(400, json=body))
    async with InferenceClient(InferenceSettings(url="http://llm.test", model="m"), transport=transport) as client:
        with pytest.raises(ContextLengthExceeded, match="available context size"):
            await client.chat(HELLO)


class _ScriptedServer:
    """A bare HTTP/1.1 server on a free port answering POSTs from a script, noting when each arrived."""

    def __init__(self, answers: list[tuple[int, dict[str, str], bytes]]) -> None:
        self.answers = answers
        self.arrivals: list[float] = []
        self.heads: list[bytes] = []

    async def _serve(self, stream: anyio.abc.ByteStream) -> None:
        buffer = b""
        async with stream:
            while self.answers:
                while b"\r\n\r\n" not in buffer:
                    try:
                        buffer += await stream.receive()
                    except (anyio.EndOfStream, anyio.BrokenResourceError):
                        return
                head, _, buffer = buffer.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                while len(buffer) < length:
                    buffer += await stream.receive()
                buffer = buffer[length:]
                self.arrivals.append(anyio.current_time())
                self.heads.append(head)
                status, headers, body = self.answers.pop(0)
                # "connection: close": the body's end is the connection's, with no length said ahead
                length_line = [] if headers.get("connection") == "close" else [f"content-length: {len(body)}"]
                lines = [f"HTTP/1.1 {status} X", *length_line, "content-type: application/json",
                         *(f"{k}: {v}" for k, v in headers.items())]
                await stream.send(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
                if not length_line:
                    return


def _completion(text: str) -> bytes:
    return json.dumps({"id": "c1", "model": "m", "choices": [{"index": 0, "finish_reason": "stop",
                       "message": {"role": "assistant", "content": text}}],
                       "usage": {"prompt_tokens": 3, "completion_tokens": 2}}).encode()


async def _chat_through(server: _ScriptedServer, call: Callable[[InferenceClient], Awaitable[Any]] | None = None,
                        **settings: Any) -> Any:
    """One call (``chat(HELLO)`` unless given) to ``server``, which answers while it lasts, with ``settings``."""
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    here = f"http://127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}"
    settings = {"url": here, "model": "m", **settings}
    outcome: Any
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, server._serve)
        try:
            async with InferenceClient(InferenceSettings.model_validate(settings)) as client:
                outcome = await (call(client) if call else client.chat(HELLO))
        except Exception as exc:  # raised below, outside the task group, as the caller would see it
            outcome = exc
        tg.cancel_scope.cancel()
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


async def test_retry_after_from_the_server_is_honoured(http_client: str) -> None:
    server = _ScriptedServer([(429, {"retry-after": "0.4"}, b'{"error": {"message": "slow down"}}'),
                              (200, {}, _completion("hello"))])
    result = await _chat_through(server, http=http_client, backoff_initial=0.01, backoff_max=2.0)
    assert result.text == "hello"
    assert server.arrivals[1] - server.arrivals[0] >= 0.4  # full jitter alone would wait at most 0.01 s


async def test_http_proxy_from_the_environment_carries_the_call(http_client: str,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    proxy = _ScriptedServer([(200, {}, _completion("via the proxy"))])
    for name in ("NO_PROXY", "no_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{listener.extra(anyio.abc.SocketAttribute.local_port)}")
    async with listener, anyio.create_task_group() as tg:
        tg.start_soon(listener.serve, proxy._serve)
        settings = InferenceSettings(url="http://llm.invalid:8000", model="m", http=http_client, max_retries=0)
        async with InferenceClient(settings) as client:
            result = await client.chat(HELLO)
        tg.cancel_scope.cancel()
    assert result.text == "via the proxy"
    assert proxy.heads[0].startswith(b"POST http://llm.invalid:8000/v1/chat/completions "), proxy.heads[0][:80]


async def test_no_proxy_from_the_environment_is_honoured(http_client: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:  # a proxy that is not there: using it would fail the call
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    for name in ("no_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{dead}")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    result = await _chat_through(_ScriptedServer([(200, {}, _completion("direct"))]), http=http_client, max_retries=0)
    assert result.text == "direct"


async def test_a_refused_connection_is_unavailable_after_the_retries(http_client: str) -> None:
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = InferenceSettings(url=f"http://127.0.0.1:{port}", model="m", http=http_client, max_retries=1,
                                 backoff_initial=0.01)
    async with InferenceClient(settings) as client:
        with pytest.raises(InferenceUnavailable, match="cannot talk to"):
            await client.chat(HELLO)


async def test_aiohttp_asked_for_with_an_httpx_transport_is_a_clear_error() -> None:
    transport = httpx.MockTransport(lambda request: httpx.Response(200))
    with pytest.raises(InferenceError, match=r"http='aiohttp'\) cannot use an httpx transport"):
        async with InferenceClient(InferenceSettings(http="aiohttp"), transport=transport):
            pass


async def test_check_logs_which_http_client_carries_the_completions(sim_llm: SimulatedVLLM, http_client: str) -> None:
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))  # other tests set WARNING
    try:
        async with InferenceClient(fast(sim_llm)) as client:
            with structlog.testing.capture_logs() as logs:
                await client.check()
    finally:
        structlog.configure(**saved)
    checked = [entry for entry in logs if entry["event"] == "inference_checked"]
    assert [entry["completions_over"] for entry in checked] == [http_client]


async def test_an_answer_nested_past_the_json_parser_is_an_unreadable_completion(http_client: str) -> None:
    deep = b"[" * 100_000  # deep enough to exhaust json's recursion, not only invalid
    server = _ScriptedServer([(200, {}, deep), (200, {}, deep)])
    with pytest.raises(BadCompletion, match="unreadable JSON"):
        await _chat_through(server, http=http_client, max_retries=1, backoff_initial=0.01)
    assert len(server.arrivals) == 2  # retried, as any unreadable body is


async def test_a_structured_answer_nested_past_the_json_parser_is_a_bad_completion(http_client: str) -> None:
    server = _ScriptedServer([(200, {}, _completion("[" * 100_000))])
    with pytest.raises(BadCompletion, match="not valid JSON"):
        await _chat_through(server, lambda client: client.chat_json(HELLO, {"type": "array"}), http=http_client)


@pytest.mark.parametrize("said", [True, False], ids=["length-said", "length-unsaid"])
async def test_an_answer_past_max_response_bytes_is_refused_without_holding_it(http_client: str, said: bool) -> None:
    huge = _completion("x" * 300_000)
    server = _ScriptedServer([(200, {} if said else {"connection": "close"}, huge)] * 2)
    with pytest.raises(BadCompletion, match=r"larger than max_response_bytes \(100000 bytes\)"):
        await _chat_through(server, http=http_client, max_response_bytes=100_000, max_retries=1,
                            backoff_initial=0.01)
    assert len(server.arrivals) == 1  # not retried: the same server would send the same again
    small = _ScriptedServer([(200, {"connection": "close"}, _completion("fits"))])
    assert (await _chat_through(small, http=http_client, max_response_bytes=100_000)).text == "fits"


async def test_a_stream_line_past_max_response_bytes_is_refused() -> None:
    endless = b"data: " + b"x" * 300_000  # an event that never ends
    server = _ScriptedServer([(200, {"connection": "close", "content-type": "text/event-stream"}, endless)])

    async def stream(client: InferenceClient) -> list[Any]:
        return [event async for event in client.stream_chat(HELLO)]

    with pytest.raises(BadCompletion, match="longer than 100000 bytes"):
        await _chat_through(server, stream, max_response_bytes=100_000, max_retries=0)


async def test_control_answers_past_max_response_bytes_are_refused() -> None:
    models = json.dumps({"data": [{"id": "m" * 200_000}]}).encode()
    server = _ScriptedServer([(200, {}, b"{}"), (200, {"connection": "close"}, models)])
    with pytest.raises(InferenceUnavailable, match=r"/v1/models answered more than 100000 bytes"):
        await _chat_through(server, lambda client: client.check(), max_response_bytes=100_000)
    tokenize = _ScriptedServer([(200, {}, json.dumps({"count": 1, "tokens": [1] * 100_000}).encode())])
    with pytest.raises(BadCompletion, match=r"/tokenize answered more than 100000 bytes"):
        await _chat_through(tokenize, lambda client: client.count_tokens(HELLO), max_response_bytes=100_000)
