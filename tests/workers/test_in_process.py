"""Jobs through the in-process path (``Orchestrator``: manager, MemoryBus, hosted workers).

A task's ``config:`` and ``timeout_s`` as a job file gives them, handlers that block the event
loop, and who a worker's own rejection is attributed to.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict

from orchestrator import Orchestrator
from orchestrator.api import RunResult
from tests._history import transitions, verdicts
from workers import Task, Verdict, Worker
from workers.builtin import PythonWorker

pytestmark = pytest.mark.timeout(60)


class SuffixConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    suffix: str = "."


class Suffix(Worker):
    capability = "suffix"
    config_model = SuffixConfig

    async def handle(self, task: Task) -> Any:
        config = task.config
        assert isinstance(config, SuffixConfig)
        return f"{task.input}{config.suffix}"


class Blocker(Worker):
    capability = "blocker"

    async def handle(self, task: Task) -> Any:
        # From its first step, so the step is on the loop when the deadline passes, however slow the machine.
        threading.Event().wait(float(task.input))  # a blocking call in an async handler, like time.sleep
        return "woke"


class Picky(Worker):
    capability = "picky"

    async def handle(self, task: Task) -> Any:
        return task.input

    async def verify(self, task: Task, output: Any) -> Verdict:
        return Verdict(passed=False, feedback="needs more detail")


async def run(*workers: Worker, **task: Any) -> RunResult:
    async with Orchestrator(workers=list(workers)) as orch:
        return await orch.run({"goal": "g", "tasks": [{"id": "t", "max_attempts": 2, **task}]})


async def test_a_tasks_config_reaches_the_worker() -> None:
    result = await run(Suffix(), capability="suffix", input="hi", config={"suffix": "!!!"})
    assert result.accepted, result.reason
    assert result.outputs == {"t": "hi!!!"}


async def test_an_unknown_config_key_fails_the_task_once_naming_it() -> None:
    result = await run(Suffix(), capability="suffix", input="hi", config={"bogus_key": 1})
    assert not result.accepted
    [task] = result.to_dict()["tasks"]
    assert task["attempts"] == 1  # not retried: another attempt would fail the same way
    assert "task config for capability 'suffix' has unknown key 'bogus_key'" in task["reason"]


async def test_a_tasks_timeout_gives_the_python_sandbox_more_time() -> None:
    code = "import time\ntime.sleep(1)\nresult = 'slept'"
    worker = PythonWorker({"timeout_s": 0.5})
    assert (await run(worker, capability="python", instruction=code, timeout_s=10)).outputs == {"t": "slept"}
    short = await run(worker, capability="python", instruction=code, timeout_s=10, config={"timeout_s": 0.2})
    assert "snippet ran past its 0.2 s time limit" in short.to_dict()["tasks"][0]["reason"]


async def test_an_async_handler_that_blocks_the_loop_still_times_out() -> None:
    result = await run(Blocker(), capability="blocker", input=0.5, timeout_s=0.1, max_attempts=1)
    assert not result.accepted
    assert "handler ran past its 0.1 s time limit; it blocked the event loop" in result.reason


async def test_a_workers_own_rejection_names_its_capability() -> None:
    async with Orchestrator(workers=[Picky()]) as orch:
        run_ = await orch.submit({"goal": "g", "tasks": [{"id": "t", "capability": "picky", "input": "x",
                                                          "max_attempts": 1}]})
        events = [e async for e in run_.events()]
    rejects = transitions(events, "reject")
    assert rejects, [e.body.kind for e in events]
    assert {e.actor for e in rejects} == {"worker:picky"}
    assert [v.verifier for v in verdicts(events, passed=False)] == ["worker:picky"]
