"""The built-in workers read a task's config, not only their own."""

from __future__ import annotations

from workers.base import Task
from workers.builtin import LLMWorker


def test_the_llm_worker_uses_the_tasks_persona() -> None:
    worker = LLMWorker({"persona": "You are terse."})
    overrides = {"persona": "You are a ship's captain."}
    task = Task(run_id="r", task_id="t", attempt=1, capability="llm", instruction="Say hello",
                config=worker.task_config(overrides), config_overrides=overrides)
    system_and_role = " ".join(str(m["content"]) for m in worker.messages(task))
    assert "You are a ship's captain." in system_and_role
    assert "You are terse." not in system_and_role
    untouched = Task(run_id="r", task_id="t", attempt=1, capability="llm", instruction="Say hello")
    assert "You are terse." in " ".join(str(m["content"]) for m in worker.messages(untouched))
