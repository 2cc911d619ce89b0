"""The planner: a goal in, a validated task DAG out, asked of the language model through a JSON schema.

An invalid plan (a cycle, an unknown capability, a bad id) is sent back to the model with the
validation error, a bounded number of times; then planning fails with the last error.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

import structlog

from orchestrator.job import Budget, Job, parse_job
from protocol.errors import BadCompletion, JobError, OrchestratorError
from protocol.inference import InferenceClient
from protocol.prompts import build_messages
from protocol.roles import GOAL_HEADING, ROLE_PLANNER

__all__ = ("PLAN_SCHEMA", "PlanError", "Planner")

log = structlog.get_logger("orchestrator.planner")

PLAN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "tasks": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "properties": {
                    "id": {"type": "string"},
                    "capability": {"type": "string"},
                    "instruction": {"type": "string"},
                    "depends_on": {"type": "array", "items": {"type": "string"}},
                    "spec": {"type": "object", "properties": {"description": {"type": "string"}},
                             "required": ["description"]},
                },
                "required": ["id", "capability", "instruction", "depends_on", "spec"],
            },
        },
    },
    "required": ["tasks"],
}

SYSTEM_PROMPT = (
    "You plan work for a team of agents. Split the goal into a small set of tasks (3 to 6), each one "
    "a clear instruction for a single agent, with the ids of the tasks it needs results from in depends_on "
    "(no cycles). Give every task a spec.description saying what a good result must contain, so a verifier "
    "can check it. Reply with JSON only."
)


class PlanError(OrchestratorError):
    """The model did not produce a valid plan within the allowed attempts."""


class Planner:
    """``job = await Planner(client, capabilities={"llm"}).plan(goal)``."""

    def __init__(self, client: InferenceClient, *, capabilities: Collection[str] = ("llm",), max_asks: int = 3,
                 budget: Budget | None = None, max_tokens: int = 1024) -> None:
        self.client = client
        self.capabilities = sorted(capabilities)
        self.max_asks = max_asks
        self.budget = budget or Budget()
        self.max_tokens = max_tokens
        self.tokens = 0

    async def plan(self, goal: str) -> Job:
        """A validated job for ``goal``; PlanError after ``max_asks`` invalid answers."""
        role = f"{ROLE_PLANNER}\nCapabilities you may use: {', '.join(self.capabilities)}."
        messages = build_messages(system=SYSTEM_PROMPT, role=role, variable=f"{GOAL_HEADING} {goal}")
        error = ""
        for ask in range(1, self.max_asks + 1):
            try:
                result = await self.client.chat(messages, json_schema=PLAN_SCHEMA, schema_name="plan",
                                                max_tokens=self.max_tokens, temperature=0.0)
            except BadCompletion as exc:
                error = str(exc)
                log.warning("plan_unusable", ask=ask, error=error)
                messages = [*messages, {"role": "user", "content": f"Your answer was unusable: {error}. Reply "
                                                                   "with a plan that matches the JSON schema."}]
                continue
            self.tokens += result.usage.total_tokens
            try:
                job = parse_job({"goal": goal, "tasks": result.data["tasks"],
                                 "budget": self.budget.model_dump()}, source="plan", capabilities=self.capabilities)
            except JobError as exc:
                error = str(exc)
                log.warning("plan_invalid", ask=ask, error=error)
                messages = [*messages, {"role": "assistant", "content": json.dumps(result.data)},
                            {"role": "user", "content": f"That plan is invalid: {error}. Return a corrected plan."}]
                continue
            log.info("plan_made", tasks=len(job.tasks), asks=ask)
            return job
        raise PlanError(f"no valid plan for the goal after {self.max_asks} attempts; last problem: {error}")
