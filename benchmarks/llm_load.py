"""One burst of agent calls sent three ways to an OpenAI-compatible server, for ``llm_saturation.py --url``.

- ``plain``: a plain load generator, the way vLLM's own serving benchmark sends load: aiohttp, one
  connection pool, a semaphore of ``concurrency``, the JSON body posted and the usage read back.
- ``client``: the same calls through one ``InferenceClient`` (``max_concurrency=concurrency``), the
  shared client every agent of a process uses: its limiter, sharded pool, retries and usage ledger.
- ``job``: the whole framework embedded: ``Orchestrator`` on its defaults runs one job of ``requests``
  tasks, each a worker calling the model through that client, each answer checked against the task's
  spec (a JSON schema) and accepted. Worker concurrency is ``concurrency``.

Every arm sends the same prompts (the worker layout of ``build_messages``: a shared preamble, role and
spec, then a short instruction that differs per call) with the same ``max_tokens``, and is measured from
its first request to its last answer, after a one-call warm-up. Token throughput is the completion tokens
the server reported over that time.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from pydantic import BaseModel, Field

from orchestrator.api import Orchestrator
from protocol.inference import InferenceClient, InferenceSettings
from protocol.prompts import build_messages
from protocol.roles import ROLE_WORKER
from workers import Task, Worker

SYSTEM = (
    "You are one worker in a multi-agent system. A manager splits a goal into tasks; you complete one task, "
    "exactly as instructed, and a verifier checks your answer against the task's spec. Be concrete, cite the "
    "facts you rely on, keep to the requested format, and never invent sources. "
) * 6
SPEC = {"description": "Answer in three numbered points and a one-line conclusion.", "max_words": 150,
        "format": "numbered list", "language": "en"}
ARMS = ("plain", "client", "job")


def messages(i: int) -> list[dict[str, Any]]:
    """Call ``i``'s chat messages: the shared worker prefix, then its own instruction."""
    return build_messages(system=SYSTEM, role=ROLE_WORKER, spec=SPEC,
                          variable=f"Instruction: describe option {i} for the migration plan of team {i % 37}")


@dataclass(frozen=True)
class Workload:
    url: str
    model: str
    requests: int
    concurrency: int
    max_tokens: int
    http: str = "auto"  # InferenceSettings.http: the framework's HTTP client for completions


@dataclass(frozen=True)
class ArmResult:
    arm: str
    wall_s: float
    completion_tokens: int
    cpu_s: float
    requests: int

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.wall_s

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.wall_s

    @property
    def cpu_us_per_request(self) -> float:
        return self.cpu_s / self.requests * 1e6


async def _timed(arm: str, w: Workload, burst: Callable[[], Awaitable[int]]) -> ArmResult:
    """Run ``burst`` (which returns the completion tokens it got) and time it, wall and this process's CPU."""
    cpu, start = time.process_time(), time.perf_counter()
    tokens = await burst()
    return ArmResult(arm, time.perf_counter() - start, tokens, time.process_time() - cpu, w.requests)


async def run_plain(w: Workload) -> ArmResult:
    import aiohttp  # the load generator's own client, as vLLM's benchmark uses; a test dependency here

    connector = aiohttp.TCPConnector(limit=w.concurrency)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(w.url, connector=connector, timeout=timeout) as session:
        async def post(i: int, max_tokens: int) -> int:
            body = {"model": w.model, "messages": messages(i), "max_tokens": max_tokens}
            async with session.post("/v1/chat/completions", json=body) as resp:
                resp.raise_for_status()
                answer = await resp.json()
            return int(answer["usage"]["completion_tokens"])

        await post(-1, 1)
        slots = anyio.Semaphore(w.concurrency)
        totals: list[int] = []

        async def one(i: int) -> None:
            async with slots:
                totals.append(await post(i, w.max_tokens))

        async def burst() -> int:
            async with anyio.create_task_group() as tg:
                for i in range(w.requests):
                    tg.start_soon(one, i)
            return sum(totals)

        return await _timed("plain", w, burst)


def _client(w: Workload) -> InferenceClient:
    return InferenceClient(InferenceSettings(url=w.url, model=w.model, max_concurrency=w.concurrency, timeout=600,
                                             http=w.http))


async def run_client(w: Workload) -> ArmResult:
    async with _client(w) as client:
        await client.check()
        await client.warm(messages(-1))
        before = client.usage.total.completion_tokens

        async def one(i: int) -> None:
            await client.chat(messages(i), max_tokens=w.max_tokens, run_id="bench", task_id=str(i))

        async def burst() -> int:
            async with anyio.create_task_group() as tg:
                for i in range(w.requests):
                    tg.start_soon(one, i)
            return client.usage.total.completion_tokens - before

        return await _timed("client", w, burst)


class CallModelConfig(BaseModel):
    max_tokens: int = Field(default=64, gt=0)


class CallModel(Worker):
    """Answers task ``i`` with the model's completion of ``messages(i)``, whatever its length."""

    capability = "call_model"
    config_model = CallModelConfig
    config: CallModelConfig
    needs_inference = True

    async def handle(self, task: Task) -> str:
        result = await self.context.inference.chat(messages(int(task.input)), max_tokens=self.config.max_tokens,
                                                   run_id=task.run_id, task_id=task.task_id)
        return str(result.text)


def model_job(n: int) -> dict[str, Any]:
    """``n`` independent tasks, call ``i`` each, whose answer must be a string."""
    return {"goal": "saturate the model", "budget": {"max_tasks": max(n, 1)}, "tasks": [
        {"id": f"t{i}", "capability": "call_model", "input": i, "spec": {"schema": {"type": "string"}}}
        for i in range(n)]}


async def run_job(w: Workload) -> ArmResult:
    async with _client(w) as client:
        await client.check()
        await client.warm(messages(-1))
        worker = CallModel({"max_tokens": w.max_tokens})
        async with Orchestrator(workers=[worker], concurrency=w.concurrency, llm=client) as orch:
            before = client.usage.total.completion_tokens

            async def burst() -> int:
                result = await orch.run(model_job(w.requests))
                if not result.accepted:
                    raise RuntimeError(f"the job ended {result.state}: {result.reason}")
                return client.usage.total.completion_tokens - before

            return await _timed("job", w, burst)


RUNNERS: dict[str, Callable[[Workload], Awaitable[ArmResult]]] = {
    "plain": run_plain, "client": run_client, "job": run_job}
