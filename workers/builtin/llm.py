"""The built-in ``llm`` worker: answers a task with the shared inference server (vLLM).

The prompt is laid out for vLLM's prefix cache: the system text, the worker role and the
task's spec come first (identical for every attempt at a task), then the dependencies'
outputs, and last what changes between attempts: the instruction, the input and the
verifiers' feedback.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from protocol.errors import BadCompletion, ConfigError
from protocol.inference import InferenceClient
from protocol.prompts import build_messages
from protocol.roles import FEEDBACK_HEADING, INSTRUCTION_HEADING, ROLE_WORKER
from workers.base import Task, Worker

__all__ = ("SYSTEM_PROMPT", "LLMConfig", "LLMWorker")

SYSTEM_PROMPT = (
    "You are one agent in a team that works through a plan task by task. Each answer is checked "
    "against the task's spec before it is accepted; when it is sent back, the verifier's feedback says "
    "what to fix. Answer the instruction directly and completely, in plain text."
)


class LLMConfig(BaseModel):
    """How the ``llm`` worker asks the model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_tokens: int = Field(default=768, gt=0)
    temperature: float | None = Field(default=None, ge=0)
    persona: str = "You are a careful analyst and writer."


class LLMWorker(Worker):
    """Does a task by asking the language model, with the plan, context and feedback in the prompt."""

    capability = "llm"
    config_model = LLMConfig
    config: LLMConfig
    needs_inference: ClassVar[bool] = True

    async def handle(self, task: Task) -> str:
        client = self.context.inference
        if not isinstance(client, InferenceClient):
            raise ConfigError("the 'llm' worker needs a language model: set ORCH_LLM_URL (or --llm-url)")
        config: LLMConfig = self.config_for(task)
        result = await client.chat(self.messages(task), max_tokens=config.max_tokens,
                                   temperature=config.temperature, run_id=task.run_id, task_id=task.task_id)
        text = result.text.strip()
        if not text:
            raise BadCompletion("the model returned an empty answer")
        if result.finish_reason == "length":
            raise BadCompletion(f"the answer was cut off at max_tokens={config.max_tokens}")
        return text

    def messages(self, task: Task) -> list[dict[str, Any]]:
        """The chat messages for ``task``: stable parts first, what changes per attempt last."""
        context = "\n\n".join(f"Result of {dep}:\n{_text(out)}" for dep, out in sorted(task.dependencies.items()))
        variable = [f"{INSTRUCTION_HEADING} {task.instruction}"]
        if task.input is not None:
            variable.append(f"Input:\n{_text(task.input)}")
        if task.feedback:
            lines = [f"- {f}" for f in task.feedback] + [f"- correction: {c}" for c in task.corrections]
            variable.append(f"{FEEDBACK_HEADING}\n" + "\n".join(lines))
            if task.plan:
                variable.append(f"Plan: {task.plan}")
        config: LLMConfig = self.config_for(task)
        return build_messages(system=SYSTEM_PROMPT, role=f"{ROLE_WORKER}\n{config.persona}",
                              spec=task.spec_description or None, context=context or None,
                              variable="\n\n".join(variable))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True, default=str)
