"""The client, planner, worker and judge against a real model behind a real server over real HTTP.

llama.cpp's ``llama-server`` serving SmolLM2-135M-Instruct, built once by ``scripts/real-model``;
these tests skip with the reason when that cache is absent. The model is tiny and runs on the CPU,
so every call keeps ``max_tokens`` tight, and the assertions are about the protocol (shapes,
accounting, retries, schema conformance), not about the quality of the answers.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import Any

import httpx
import jsonschema
import pytest

from orchestrator import Orchestrator
from orchestrator._schema_bound import json_token_bound
from orchestrator.judge import LLMJudge
from orchestrator.planner import Planner
from orchestrator.real_model import LlamaServer
from orchestrator.records import TaskRecord
from protocol.errors import ContextLengthExceeded
from protocol.inference import InferenceClient
from protocol.usage import UsageLedger
from workers.builtin.llm import LLMWorker

pytestmark = [pytest.mark.realmodel, pytest.mark.timeout(300)]

HELLO = [{"role": "user", "content": "Say hello in one short sentence."}]


async def test_check_finds_the_served_model(real_llm: LlamaServer) -> None:
    async with InferenceClient(real_llm.settings(model=None)) as client:
        info = await client.check()
    assert info.model == real_llm.model
    assert client.model == real_llm.model


async def test_chat_text_and_token_accounting_per_run_and_task(real_llm: LlamaServer) -> None:
    ledger = UsageLedger()
    async with InferenceClient(real_llm.settings(), ledger=ledger) as client:
        first = await client.chat(HELLO, max_tokens=8, run_id="r1", task_id="t1")
        second = await client.chat(HELLO, max_tokens=8, run_id="r1", task_id="t2")
    assert first.text
    assert first.finish_reason in ("stop", "length")
    assert first.usage.prompt_tokens > 5
    assert 1 <= first.usage.completion_tokens <= 8
    assert ledger.task("r1", "t1").total_tokens == first.usage.total_tokens
    assert ledger.run("r1").total_tokens == first.usage.total_tokens + second.usage.total_tokens
    assert ledger.run("r1").requests == 2


async def test_structured_output_matches_the_json_schema(real_llm: LlamaServer) -> None:
    schema = {"type": "object", "additionalProperties": False, "required": ["city", "country"],
              "properties": {"city": {"type": "string", "maxLength": 24},
                             "country": {"type": "string", "maxLength": 24}}}
    messages = [{"role": "user", "content": "Name the capital of France and its country, as JSON."}]
    async with InferenceClient(real_llm.settings()) as client:
        result = await client.chat(messages, json_schema=schema, max_tokens=json_token_bound(schema))
    jsonschema.validate(result.data, schema)
    assert set(result.data) == {"city", "country"}


async def test_streaming_yields_deltas_then_the_usage(real_llm: LlamaServer) -> None:
    async with InferenceClient(real_llm.settings()) as client, aclosing(client.stream_chat(HELLO, max_tokens=12,
                                                                                           run_id="r")) as stream:
        events = [event async for event in stream]
        recorded = client.usage.run("r")
    *deltas, last = events
    assert deltas
    assert all(e.text for e in deltas)
    assert last.text == ""
    assert last.finish_reason in ("stop", "length")
    assert last.usage is not None
    assert 1 <= last.usage.completion_tokens <= 12
    assert recorded.completion_tokens == last.usage.completion_tokens


class _FlakyHop(httpx.AsyncBaseTransport):
    """In front of the real server: the first generations fail (a 503, then a dropped connection)."""

    def __init__(self, failures: list[str]) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.failures = failures
        self.seen: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/chat/completions") and self.failures:
            failure = self.failures.pop(0)
            self.seen.append(failure)
            if failure == "drop":
                raise httpx.RemoteProtocolError("server disconnected without sending a response", request=request)
            return httpx.Response(503, json={"error": {"message": "overloaded", "code": 503}})
        self.seen.append("passed")
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_failed_tries_are_retried_until_the_real_server_answers(real_llm: LlamaServer) -> None:
    hop = _FlakyHop(["503", "drop"])
    async with InferenceClient(real_llm.settings(max_retries=3), transport=hop) as client:
        result = await client.chat(HELLO, max_tokens=8)
    assert result.text
    assert hop.seen == ["503", "drop", "passed"]


async def test_a_prompt_longer_than_the_context_is_context_length_exceeded(real_llm: LlamaServer) -> None:
    too_long = [{"role": "user", "content": "word " * (real_llm.context + 500)}]
    async with InferenceClient(real_llm.settings()) as client:
        with pytest.raises(ContextLengthExceeded):
            await client.chat(too_long, max_tokens=8)


async def test_planner_turns_a_goal_into_a_valid_bounded_plan(real_llm: LlamaServer) -> None:
    async with InferenceClient(real_llm.settings()) as client:
        planner = Planner(client, capabilities=["llm"])
        job = await planner.plan("write a haiku about redis")
    assert 1 <= len(job.tasks) <= planner.limits.max_tasks
    assert all(t.capability == "llm" and t.instruction for t in job.tasks)
    assert planner.tokens > 0


async def test_judge_returns_a_verdict_with_its_tokens(real_llm: LlamaServer) -> None:
    task = TaskRecord(id="t", capability="llm", instruction="Name a colour.",
                      spec={"description": "One colour name."})
    async with InferenceClient(real_llm.settings()) as client:
        verdict = await LLMJudge(client)(task, "Blue")
    assert verdict.verifier == "llm-judge"
    assert verdict.tokens > 0


async def test_a_task_is_worked_and_judged_end_to_end(real_llm: LlamaServer) -> None:
    job: dict[str, Any] = {"goal": "g", "budget": {"max_attempts": 3}, "tasks": [
        {"id": "colour", "capability": "llm", "instruction": "Name one colour. Reply with one word.",
         "spec": {"description": "A single colour name."}}]}
    async with Orchestrator(workers=[LLMWorker({"max_tokens": 32})], llm=real_llm.settings()) as orch:
        run = await orch.submit(job)
        events = [e async for e in run.events()]
        result = await run.wait()
    task = result.record.tasks["colour"]
    assert result.state in ("accepted", "failed")
    answered = [e for e in events if getattr(e.body, "event", None) == "done"]
    judged = [v.verifier for e in events if (v := e.verdict) is not None and v.stage == "judge"]
    assert answered, "the small model answered none of 3 attempts within 32 tokens"
    assert judged[:1] == ["llm-judge"], [e.body for e in events]  # every answer goes to the judge
    assert task.tokens > 0
    assert result.record.tokens >= task.tokens
