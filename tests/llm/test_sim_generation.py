"""The simulator's generation surface through the official openai SDK: n, prompt forms, echo, logprobs,
token ids, truncation, min_tokens and the streaming usage rules of vLLM 0.33."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from orchestrator.simulator import SimConfig, SimulatedVLLM
from orchestrator.testing import held_in_task

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedVLLM]:
    async with held_in_task(SimulatedVLLM(SimConfig(time_scale=0.002, max_model_len=1024))) as sim:
        yield sim


@pytest.fixture
async def client(sim: SimulatedVLLM) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="x", max_retries=0) as client:
        yield client


async def _sse(sim: SimulatedVLLM, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        r = await http.post(path, json={**body, "stream": True})
    assert r.status_code == 200, r.text
    events = [line.removeprefix("data: ") for line in r.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


async def test_empty_stream_options_gives_no_usage_chunk(sim: SimulatedVLLM) -> None:
    chunks = await _sse(sim, "/v1/chat/completions", {"messages": MESSAGES, "stream_options": {}})
    assert all(c["choices"] for c in chunks)
    assert all("usage" not in c for c in chunks)


async def test_include_usage_false_gives_no_usage_chunk(sim: SimulatedVLLM) -> None:
    chunks = await _sse(sim, "/v1/completions", {"prompt": "hi", "stream_options": {"include_usage": False}})
    assert all(c["choices"] and "usage" not in c for c in chunks)


async def test_continuous_usage_stats(sim: SimulatedVLLM) -> None:
    chunks = await _sse(sim, "/v1/chat/completions", {
        "messages": MESSAGES, "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
    assert chunks[-1]["choices"] == []
    with_choices = [c for c in chunks if c["choices"]]
    assert all("usage" in c for c in with_choices)
    counts = [c["usage"]["completion_tokens"] for c in with_choices]
    assert counts == sorted(counts)
    assert counts[-1] == chunks[-1]["usage"]["completion_tokens"]


async def test_force_include_usage() -> None:
    async with SimulatedVLLM(SimConfig(time_scale=0.002, enable_force_include_usage=True)) as sim:
        chunks = await _sse(sim, "/v1/chat/completions", {"messages": MESSAGES})
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] > 0


async def test_n_choices(client: openai.AsyncOpenAI, sim: SimulatedVLLM) -> None:
    resp = await client.chat.completions.create(model=sim.model, messages=MESSAGES, n=3)
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert all(c.message.content for c in resp.choices)
    assert resp.usage is not None
    assert resp.usage.completion_tokens > 0
    assert resp.usage.completion_tokens % 3 == 0  # the same scripted answer three times, counted per choice


async def test_n_choices_streamed(client: openai.AsyncOpenAI, sim: SimulatedVLLM) -> None:
    stream = await client.chat.completions.create(model=sim.model, messages=MESSAGES, n=2, stream=True)
    texts: dict[int, str] = {}
    finished = set()
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1}
    assert texts[0]
    assert texts[1]


async def test_batched_and_token_prompts(client: openai.AsyncOpenAI, sim: SimulatedVLLM) -> None:
    resp = await client.completions.create(model=sim.model, prompt=["one", "two"], n=2, max_tokens=16)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert "one" in resp.choices[0].text
    assert "two" in resp.choices[2].text
    async with httpx.AsyncClient(base_url=sim.url) as http:
        ids = (await http.post("/tokenize", json={"prompt": "Once upon a time"})).json()["tokens"]
    single = await client.completions.create(model=sim.model, prompt=ids, max_tokens=5)
    assert single.usage is not None
    assert single.usage.prompt_tokens == len(ids)
    batch = await client.completions.create(model=sim.model, prompt=[ids, ids[:2]], max_tokens=5)
    assert batch.usage is not None
    assert batch.usage.prompt_tokens == len(ids) + 2
    assert len(batch.choices) == 2


async def test_echo_and_logprobs_on_completions(client: openai.AsyncOpenAI, sim: SimulatedVLLM) -> None:
    resp = await client.completions.create(model=sim.model, prompt="Hello there", echo=True, logprobs=3,
                                           max_tokens=4)
    choice = resp.choices[0]
    assert choice.text.startswith("Hello there")
    lp = choice.logprobs
    assert lp is not None
    assert lp.tokens
    assert lp.token_logprobs
    assert lp.top_logprobs
    assert lp.text_offset
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset)
    assert lp.token_logprobs[0] is None  # the first prompt token has no logprob
    assert "".join(lp.tokens) == choice.text
    assert all(v is None or v < 0 for v in lp.token_logprobs)
    assert all(t is None or 1 <= len(t) <= 3 for t in lp.top_logprobs)
    only_echo = await client.completions.create(model=sim.model, prompt="Hello there", echo=True, max_tokens=0)
    assert only_echo.choices[0].text == "Hello there"


async def test_chat_logprobs(client: openai.AsyncOpenAI, sim: SimulatedVLLM) -> None:
    resp = await client.chat.completions.create(model=sim.model, messages=MESSAGES, logprobs=True,
                                                top_logprobs=2, max_tokens=5)
    content = resp.choices[0].logprobs and resp.choices[0].logprobs.content
    assert content
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    for t in content:
        assert t.logprob < 0
        assert t.bytes == list(t.token.encode())
        assert len(t.top_logprobs) == 2
        assert t.top_logprobs[0].token == t.token
        assert t.top_logprobs[1].logprob < t.top_logprobs[0].logprob


async def test_prompt_logprobs_and_token_ids(sim: SimulatedVLLM) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        r = await http.post("/v1/completions", json={"prompt": "a b c", "prompt_logprobs": 1,
                                                     "return_token_ids": True, "max_tokens": 3})
        chat = await http.post("/v1/chat/completions", json={"messages": MESSAGES, "prompt_logprobs": 0,
                                                             "return_token_ids": True, "max_tokens": 3})
    choice = r.json()["choices"][0]
    assert choice["prompt_logprobs"][0] is None
    assert len(choice["prompt_logprobs"]) == len(choice["prompt_token_ids"])
    first = choice["prompt_logprobs"][1]
    assert str(choice["prompt_token_ids"][1]) in first
    assert {"logprob", "rank", "decoded_token"} <= set(first[str(choice["prompt_token_ids"][1])])
    assert len(choice["token_ids"]) == r.json()["usage"]["completion_tokens"]
    body = chat.json()
    assert body["prompt_logprobs"][0] is None
    assert len(body["prompt_token_ids"]) == body["usage"]["prompt_tokens"]
    assert len(body["choices"][0]["token_ids"]) == body["usage"]["completion_tokens"]


async def test_truncate_prompt_tokens_and_min_tokens(client: openai.AsyncOpenAI, sim: SimulatedVLLM) -> None:
    long_prompt = "word " * 300
    resp = await client.completions.create(model=sim.model, prompt=long_prompt, max_tokens=5,
                                           extra_body={"truncate_prompt_tokens": 10})
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == 10
    resp = await client.completions.create(model=sim.model, prompt="hi", max_tokens=200,
                                           extra_body={"min_tokens": 150})
    assert resp.usage is not None
    assert resp.usage.completion_tokens >= 150
    resp = await client.completions.create(model=sim.model, prompt="hi", max_tokens=40,
                                           extra_body={"ignore_eos": True})
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 40
    assert resp.choices[0].finish_reason == "length"


async def test_minus_one_means_the_whole_vocabulary() -> None:
    config = SimConfig(time_scale=0.002, vocab_size=500, max_logprobs=-1)
    async with SimulatedVLLM(config) as sim, httpx.AsyncClient(base_url=sim.url) as http:
        r = await http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1, "logprobs": "true",
                                                          "top_logprobs": -1, "prompt_logprobs": -1})
        body = r.json()
        tops = body["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
        assert len(tops) == 500
        assert len({t["logprob"] for t in tops}) == 500
        assert len(body["prompt_logprobs"][1]) == 500
    async with SimulatedVLLM(SimConfig(time_scale=0.002)) as sim, httpx.AsyncClient(base_url=sim.url) as http:
        r = await http.post("/v1/chat/completions", json={"messages": MESSAGES, "logprobs": True, "top_logprobs": -1})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == ("Requested sample logprobs of 151936, which is greater than max "
                                            "allowed: 20")


async def test_echo_with_continue_final_message(client: openai.AsyncOpenAI, sim: SimulatedVLLM) -> None:
    saying = "An apple a day, keeps"
    for echo in (True, False):
        resp = await client.chat.completions.create(
            model=sim.model, messages=[{"role": "user", "content": "a saying"}, {"role": "assistant", "content": saying}],
            extra_body={"echo": echo, "continue_final_message": True, "add_generation_prompt": False})
        content = resp.choices[0].message.content or ""
        assert (saying in content) is echo
        assert resp.choices[0].finish_reason == "stop"


async def test_streamed_token_ids_match_logprob_tokens(client: openai.AsyncOpenAI, sim: SimulatedVLLM) -> None:
    stream = await client.completions.create(model=sim.model, prompt="Tell me a fact:", max_tokens=12, stream=True,
                                             logprobs=1, extra_body={"return_token_ids": True,
                                                                     "return_tokens_as_token_ids": True})
    prompt_ids: list[int] | None = None
    ids: list[int] = []
    from_logprobs: list[int] = []
    async for chunk in stream:
        choice = chunk.choices[0]
        extra = choice.model_dump()
        if prompt_ids is None:
            prompt_ids = extra["prompt_token_ids"]
        ids += extra["token_ids"]
        assert choice.logprobs is not None
        from_logprobs += [int(t.removeprefix("token_id:")) for t in choice.logprobs.tokens or []]
    assert prompt_ids
    assert ids
    assert ids == from_logprobs
