"""The simulator driven by the official openai SDK: shapes and errors must be what the SDK expects of vLLM."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from orchestrator.simulator import SimConfig, SimulatedVLLM
from orchestrator.testing import held_in_task

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedVLLM]:
    config = SimConfig(time_scale=0.005, api_keys=("sk-test",), max_model_len=2048)
    async with held_in_task(SimulatedVLLM(config)) as sim:
        yield sim


@pytest.fixture
async def client(sim: SimulatedVLLM) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="sk-test", max_retries=0) as client:
        yield client


async def test_models(client: openai.AsyncOpenAI, sim: SimulatedVLLM) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == [sim.model]
    assert models.data[0].owned_by == "vllm"


async def test_chat(client: openai.AsyncOpenAI, sim: SimulatedVLLM) -> None:
    raw = await client.chat.completions.with_raw_response.create(model=sim.model, messages=MESSAGES)
    assert raw.headers["x-simulated"] == "true"
    resp = raw.parse()
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == sim.model
    assert resp.system_fingerprint == "orchestrator-simulator"
    assert resp.choices[0].message.role == "assistant"
    assert resp.choices[0].message.content
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens


async def test_max_tokens_gives_length(client: openai.AsyncOpenAI, sim: SimulatedVLLM) -> None:
    resp = await client.chat.completions.create(model=sim.model, messages=MESSAGES, max_tokens=2)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 2


async def test_completions(client: openai.AsyncOpenAI, sim: SimulatedVLLM) -> None:
    resp = await client.completions.create(model=sim.model, prompt="Once upon a time")
    assert resp.object == "text_completion"
    assert resp.id.startswith("cmpl-")
    assert resp.choices[0].text
    assert resp.usage is not None
    assert resp.usage.completion_tokens <= 16  # vLLM's completions default max_tokens


async def test_streaming_with_usage(client: openai.AsyncOpenAI, sim: SimulatedVLLM) -> None:
    stream = await client.chat.completions.create(
        model=sim.model, messages=MESSAGES, stream=True, stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


async def test_streaming_without_usage(client: openai.AsyncOpenAI, sim: SimulatedVLLM) -> None:
    stream = await client.chat.completions.create(model=sim.model, messages=MESSAGES, stream=True)
    chunks = [c async for c in stream]
    assert all(c.usage is None for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def test_structured_output_response_format(client: openai.AsyncOpenAI, sim: SimulatedVLLM) -> None:
    schema = {"type": "object", "properties": {"colours": {"type": "array", "items": {"type": "string"},
                                                           "minItems": 3}}, "required": ["colours"]}
    resp = await client.chat.completions.create(
        model=sim.model, messages=MESSAGES,
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": schema, "strict": True}},
    )
    data = json.loads(resp.choices[0].message.content or "")
    assert len(data["colours"]) >= 3


async def test_structured_outputs_extra_body(client: openai.AsyncOpenAI, sim: SimulatedVLLM) -> None:
    resp = await client.chat.completions.create(
        model=sim.model, messages=MESSAGES,
        extra_body={"structured_outputs": {"choice": ["red", "green"]}},
    )
    assert resp.choices[0].message.content in ("red", "green")


async def test_guided_json_is_ignored_like_vllm(client: openai.AsyncOpenAI, sim: SimulatedVLLM) -> None:
    resp = await client.chat.completions.create(
        model=sim.model, messages=MESSAGES,
        extra_body={"guided_json": {"type": "object", "required": ["x"]}},
    )
    text = resp.choices[0].message.content or ""
    with pytest.raises(ValueError, match="Expecting value"):
        json.loads(text)  # unconstrained, as on vLLM >= 0.12
    assert sim.stats.ignored_fields["guided_json"] == 1


async def test_unknown_model_404(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert info.value.status_code == 404
    body = info.value.body
    assert isinstance(body, dict)
    assert body["message"] == "The model `gpt-9` does not exist."
    assert body["type"] == "NotFoundError"
    assert body["code"] == 404


async def test_prompt_over_max_model_len_400(client: openai.AsyncOpenAI, sim: SimulatedVLLM) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(
            model=sim.model, messages=[{"role": "user", "content": "lorem ipsum " * 3000}],
        )
    assert "maximum context length is 2048 tokens" in str(info.value)


async def test_max_tokens_is_clamped_to_the_context_left(client: openai.AsyncOpenAI, sim: SimulatedVLLM) -> None:
    # vLLM 0.33 clamps max_tokens to max_model_len - prompt (get_max_tokens); only max_tokens > max_model_len is a 400
    resp = await client.chat.completions.create(model=sim.model, messages=MESSAGES, max_tokens=2048)
    assert resp.choices[0].finish_reason == "stop"
    with pytest.raises(openai.BadRequestError, match="max_tokens=2049 cannot be greater than max_model_len=2048"):
        await client.chat.completions.create(model=sim.model, messages=MESSAGES, max_tokens=2049)
    with pytest.raises(openai.BadRequestError, match="max_completion_tokens=4096 cannot be greater than"):
        await client.chat.completions.create(model=sim.model, messages=MESSAGES, max_completion_tokens=4096)


async def test_wrong_api_key_401(sim: SimulatedVLLM) -> None:
    async with openai.AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="wrong", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            await bad.models.list()
    assert info.value.status_code == 401
    assert info.value.body == "Unauthorized" or info.value.body == {"error": "Unauthorized"}


async def test_stream_options_without_stream_400(client: openai.AsyncOpenAI, sim: SimulatedVLLM) -> None:
    with pytest.raises(openai.BadRequestError, match="Stream options can only be defined when `stream=True`"):
        await client.chat.completions.create(
            model=sim.model, messages=MESSAGES, stream_options={"include_usage": True},
        )


async def test_mid_stream_error_raises_api_error(client: openai.AsyncOpenAI, sim: SimulatedVLLM) -> None:
    sim.script_faults(["mid_stream_error"])
    stream = await client.chat.completions.create(model=sim.model, messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError, match="mid-stream"):
        async for _ in stream:
            pass


async def test_engine_dead_500(client: openai.AsyncOpenAI, sim: SimulatedVLLM) -> None:
    sim.kill_engine()
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model=sim.model, messages=MESSAGES)
