"""``Worker.task_config``: a task's config merged over the worker's own, and the built-in workers reading it."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

from protocol.errors import ConfigError
from workers.base import Task, Worker
from workers.builtin import LLMWorker


class AliasedConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    max_length: int = Field(default=40, alias="maxLength")
    separator: str = "-"


class Aliased(Worker):
    capability = "aliased"
    config_model = AliasedConfig

    async def handle(self, task: Task) -> Any:
        return None


class OpenConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    separator: str = "-"


class Open(Worker):
    capability = "open"
    config_model = OpenConfig

    async def handle(self, task: Task) -> Any:
        return None


def test_no_task_config_is_the_workers_own_config_object() -> None:
    worker = Aliased({"maxLength": 10})
    assert worker.task_config({}) is worker.config


def test_keys_the_worker_set_survive_and_aliases_count_as_known() -> None:
    worker = Aliased({"maxLength": 10})
    merged = worker.task_config({"separator": "_"})
    assert (merged.max_length, merged.separator) == (10, "_")  # type: ignore[attr-defined]
    assert worker.task_config({"maxLength": 5}).max_length == 5  # type: ignore[attr-defined]
    assert worker.config.max_length == 10  # type: ignore[attr-defined]  # the worker's own is untouched


def test_a_model_that_allows_extra_keys_takes_any_key() -> None:
    merged = Open().task_config({"anything": 1})
    assert merged.model_extra == {"anything": 1}


def test_one_unknown_key_is_named_with_what_the_model_takes() -> None:
    with pytest.raises(ConfigError) as info:
        Aliased().task_config({"max_len": 3})
    assert str(info.value) == ("task config for capability 'aliased' has unknown key 'max_len' "
                               "(AliasedConfig takes max_length, separator)")


def test_the_llm_worker_uses_the_tasks_persona() -> None:
    worker = LLMWorker({"persona": "You are terse."})
    overrides = {"persona": "You are a ship's captain."}
    task = Task(run_id="r", task_id="t", attempt=1, capability="llm", instruction="Say hello",
                config=worker.task_config(overrides), config_overrides=overrides)
    prompt = " ".join(str(m["content"]) for m in worker.messages(task))
    assert "You are a ship's captain." in prompt
    assert "You are terse." not in prompt
    untouched = Task(run_id="r", task_id="t", attempt=1, capability="llm", instruction="Say hello")
    assert "You are terse." in " ".join(str(m["content"]) for m in worker.messages(untouched))
