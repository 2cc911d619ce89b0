"""The LLM judge: checks an output against the spec's ``description`` and says what to correct.

Its verdict schema is bounded (a few reasons and corrections of limited length), ``max_tokens``
fits the longest verdict, and an unusable answer is asked again once with what was wrong.
"""

from __future__ import annotations

import json
from typing import Any

from orchestrator._schema_bound import json_token_bound
from orchestrator.records import TaskRecord
from protocol.errors import BadCompletion
from protocol.inference import InferenceClient
from protocol.messages import Verdict
from protocol.prompts import build_messages
from protocol.roles import ANSWER_HEADING, INSTRUCTION_HEADING, ROLE_JUDGE

__all__ = ("VERDICT_SCHEMA", "LLMJudge")

# The reasons come before the decision: a constrained decoder writes properties in this order, and a
# small model decides better after it has written why (SmolLM2-135M on benchmarks/usable_answers.py's
# 16 known cases: 11 agree with reasons first, 7 with "passed" first).
VERDICT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "reasons": {"type": "array", "items": {"type": "string", "maxLength": 160}, "maxItems": 3},
        "passed": {"type": "boolean"},
        "corrections": {"type": "array", "items": {"type": "string", "maxLength": 160}, "maxItems": 3},
    },
    "required": ["reasons", "passed", "corrections"],
    "additionalProperties": False,
}

SYSTEM_PROMPT = (
    "You verify the work of other agents. Judge the answer strictly against the spec: pass it only if it "
    "meets every requirement. Give your reasons, and for a failing answer list concrete corrections. "
    "Reply with JSON only."
)


class LLMJudge:
    """``Manager(judge=LLMJudge(client))``: used for tasks whose spec has a ``description``.

    ``max_tokens`` defaults to what the longest verdict the schema allows can take.
    """

    def __init__(self, client: InferenceClient, *, max_tokens: int | None = None, max_asks: int = 2) -> None:
        self.client = client
        bound = json_token_bound(VERDICT_SCHEMA)
        assert bound is not None, "the verdict schema is bounded"
        self.max_tokens = max_tokens or bound
        self.max_asks = max_asks

    async def __call__(self, task: TaskRecord, output: Any) -> Verdict:
        answer = output if isinstance(output, str) else json.dumps(output, ensure_ascii=False, default=str)
        base = build_messages(system=SYSTEM_PROMPT, role=ROLE_JUDGE, spec=task.spec.description,
                              variable=f"{INSTRUCTION_HEADING} {task.instruction}\n\n{ANSWER_HEADING}\n{answer}")
        messages, spent = base, 0
        for ask in range(1, self.max_asks + 1):
            try:
                result = await self.client.chat(messages, json_schema=VERDICT_SCHEMA, schema_name="verdict",
                                                max_tokens=self.max_tokens, temperature=0.0)
            except BadCompletion as exc:
                spent += exc.tokens
                if ask == self.max_asks:
                    raise BadCompletion(f"no usable verdict after {ask} asks: {exc}", tokens=spent) from exc
                messages = [*base, {"role": "user", "content": f"Your verdict was unusable: {exc}. Reply with one "
                                                               "short JSON verdict that matches the schema."}]
                continue
            data = result.data
            return Verdict(passed=bool(data["passed"]), feedback="; ".join(data["reasons"]),
                           corrections=tuple(data["corrections"]), verifier="llm-judge",
                           tokens=spent + result.usage.total_tokens)
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover
