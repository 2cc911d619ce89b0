"""Workers for the observability tests: one accepted at once, one redone once, one that fails, one held."""

from __future__ import annotations

import contextlib
from typing import Any

import anyio

from workers import Task, Worker


class Echo(Worker):
    """Returns its input."""

    capability = "echo"

    async def handle(self, task: Task) -> Any:
        return task.input


class Learner(Worker):
    """Wrong until it has feedback."""

    capability = "learner"

    async def handle(self, task: Task) -> Any:
        return "right" if task.feedback else "wrong"


class Broken(Worker):
    """Always raises."""

    capability = "broken"

    async def handle(self, task: Task) -> Any:
        raise ValueError("disk on fire")


class Gate(Worker):
    """Waits until the test opens ``Gate.open``, so the test can look at a run in flight."""

    capability = "gate"
    open: anyio.Event | None = None
    entered: anyio.Event | None = None

    async def handle(self, task: Task) -> Any:
        assert Gate.open is not None
        assert Gate.entered is not None
        Gate.entered.set()
        await Gate.open.wait()
        return "through"


class Asker(Worker):
    """Asks the language model once."""

    capability = "asker"

    async def handle(self, task: Task) -> Any:
        result = await self.context.inference.chat([{"role": "user", "content": "say hi"}], max_tokens=8,
                                                   run_id=task.run_id, task_id=task.task_id)
        return result.text


class Streamer(Worker):
    """Streams the language model's answer twice: once whole, once stopping after the first delta."""

    capability = "streamer"

    async def handle(self, task: Task) -> Any:
        messages = [{"role": "user", "content": "say hi"}]
        text = "".join([event.text async for event in self.context.inference.stream_chat(
            messages, max_tokens=8, run_id=task.run_id, task_id=task.task_id)])
        async with contextlib.aclosing(self.context.inference.stream_chat(messages, max_tokens=8)) as stream:
            async for _ in stream:
                break
        return text


JOB: dict[str, Any] = {"goal": "observability", "tasks": [
    {"id": "a", "capability": "echo", "input": 1, "spec": {"expect": 1}},
    {"id": "b", "capability": "learner", "spec": {"expect": "right"}},
    {"id": "c", "capability": "broken", "max_attempts": 1},
    {"id": "d", "capability": "gate", "depends_on": ["a"]},
]}
