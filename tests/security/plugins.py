"""Workers the adversarial tests run in real ``orchestrator worker`` processes."""

from __future__ import annotations

from typing import Any

import anyio
from pydantic import BaseModel

from workers import Task, Worker


class SlowConfig(BaseModel):
    sleep_s: float = 3.0


class Echo(Worker):
    """Returns its input."""

    capability = "echo"

    async def handle(self, task: Task) -> Any:
        return task.input


class Slow(Worker):
    """Returns its input after ``config.sleep_s`` seconds: a window in which to attack an attempt in flight."""

    capability = "slow"
    config_model = SlowConfig

    async def handle(self, task: Task) -> Any:
        config: SlowConfig = self.config_for(task)
        await anyio.sleep(config.sleep_s)
        return task.input
