"""The LLM judge: checks an output against the spec's ``description`` and says what to correct."""

from __future__ import annotations

import json
from typing import Any

from orchestrator.records import TaskRecord
from protocol.inference import InferenceClient
from protocol.messages import Verdict
from protocol.prompts import build_messages
from protocol.roles import ANSWER_HEADING, INSTRUCTION_HEADING, ROLE_JUDGE

__all__ = ("VERDICT_SCHEMA", "LLMJudge")

VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "passed": {"type": "boolean"},
        "reasons": {"type": "array", "items": {"type": "string"}},
        "corrections": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["passed", "reasons", "corrections"],
    "additionalProperties": False,
}

SYSTEM_PROMPT = (
    "You verify the work of other agents. Judge the answer strictly against the spec: pass it only if it "
    "meets every requirement. Give your reasons, and for a failing answer list concrete corrections. "
    "Reply with JSON only."
)


class LLMJudge:
    """``Manager(judge=LLMJudge(client))``: used for tasks whose spec has a ``description``."""

    def __init__(self, client: InferenceClient, *, max_tokens: int = 512) -> None:
        self.client = client
        self.max_tokens = max_tokens

    async def __call__(self, task: TaskRecord, output: Any) -> Verdict:
        answer = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False, default=str)
        messages = build_messages(system=SYSTEM_PROMPT, role=ROLE_JUDGE, spec=task.spec.description,
                                  variable=f"{INSTRUCTION_HEADING} {task.instruction}\n\n{ANSWER_HEADING}\n{answer}")
        result = await self.client.chat(messages, json_schema=VERDICT_SCHEMA, schema_name="verdict",
                                        max_tokens=self.max_tokens, temperature=0.0)
        data = result.data
        return Verdict(passed=bool(data["passed"]), feedback="; ".join(data["reasons"]),
                       corrections=tuple(data["corrections"]), verifier="llm-judge",
                       tokens=result.usage.total_tokens)
