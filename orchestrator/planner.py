"""The planner: a goal in, a validated task DAG out, asked of the language model through a JSON schema.

The schema bounds the plan (how many tasks, how long each string) and names the capabilities
served, so a constrained decoder cannot write an unknown one, and ``max_tokens`` is derived from
the schema so that the longest valid plan fits. An unusable answer (cut off, not JSON, not the
schema) or an invalid plan (a cycle, a dangling dependency) is sent back to the model with what
was wrong, a bounded number of times; then ``PlanError`` says what went wrong at each attempt.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

import structlog

from orchestrator._schema_bound import json_token_bound
from orchestrator.job import Budget, Job, parse_job
from protocol.errors import BadCompletion, JobError, OrchestratorError
from protocol.inference import InferenceClient
from protocol.prompts import build_messages
from protocol.roles import GOAL_HEADING, ROLE_PLANNER

__all__ = ("PLAN_SCHEMA", "PlanError", "PlanLimits", "Planner", "plan_schema")

log = structlog.get_logger("orchestrator.planner")


@dataclass(frozen=True, slots=True)
class PlanLimits:
    """How big a plan may be; the schema enforces it, and ``max_tokens`` is sized to fit it."""

    max_tasks: int = 5
    id_length: int = 16
    instruction_length: int = 240
    description_length: int = 160


def plan_schema(capabilities: Collection[str] = ("llm",), limits: PlanLimits | None = None) -> dict[str, Any]:
    """The JSON schema of a plan: bounded in size, capabilities limited to those served."""
    lim = limits or PlanLimits()
    task_id = {"type": "string", "pattern": f"^[a-z][a-z0-9_]{{0,{lim.id_length - 1}}}$",
               "maxLength": lim.id_length}
    return {
        "type": "object",
        "properties": {
            "tasks": {
                "type": "array",
                "minItems": 1,
                "maxItems": lim.max_tasks,
                "items": {
                    "type": "object",
                    "properties": {
                        "id": task_id,
                        "capability": {"enum": sorted(capabilities)},
                        "instruction": {"type": "string", "minLength": 1, "maxLength": lim.instruction_length},
                        "depends_on": {"type": "array", "items": task_id, "maxItems": lim.max_tasks - 1},
                        "spec": {"type": "object",
                                 "properties": {"description": {"type": "string",
                                                                "maxLength": lim.description_length}},
                                 "required": ["description"], "additionalProperties": False},
                    },
                    "required": ["id", "capability", "instruction", "depends_on", "spec"],
                    "additionalProperties": False,
                },
            },
        },
        "required": ["tasks"],
        "additionalProperties": False,
    }


PLAN_SCHEMA: dict[str, Any] = plan_schema()

SYSTEM_PROMPT = (
    "You plan work for a team of agents. Split the goal into a few tasks (1 to {max_tasks}; fewer is better), "
    "each a short, clear instruction for one agent. Give each task a short lowercase id such as t1, and in "
    "depends_on the ids of earlier tasks whose results it needs (none for the first). Give every task a "
    "spec.description: one sentence saying what a good result must contain, so a verifier can check it. "
    "Reply with JSON only."
)


class PlanError(OrchestratorError):
    """The model did not produce a valid plan within the allowed attempts; ``problems`` has one line per attempt."""

    def __init__(self, message: str, problems: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.problems = problems


class Planner:
    """``job = await Planner(client, capabilities={"llm"}).plan(goal)``.

    ``max_tokens`` defaults to what the longest plan the schema allows can take.
    """

    def __init__(self, client: InferenceClient, *, capabilities: Collection[str] = ("llm",), max_asks: int = 3,
                 budget: Budget | None = None, max_tokens: int | None = None,
                 limits: PlanLimits | None = None) -> None:
        self.client = client
        self.capabilities = sorted(capabilities)
        self.max_asks = max_asks
        self.budget = budget or Budget()
        self.limits = limits or PlanLimits()
        self.schema = plan_schema(self.capabilities, self.limits)
        bound = json_token_bound(self.schema)
        assert bound is not None, "the plan schema is bounded"
        self.max_tokens = max_tokens or bound
        self.tokens = 0
        self.asks = 0  # asks made by the latest plan()

    async def plan(self, goal: str) -> Job:
        """A validated job for ``goal``; PlanError after ``max_asks`` unusable or invalid answers."""
        role = f"{ROLE_PLANNER}\nCapabilities you may use: {', '.join(self.capabilities)}."
        system = SYSTEM_PROMPT.format(max_tasks=self.limits.max_tasks)
        base = build_messages(system=system, role=role, variable=f"{GOAL_HEADING} {goal}")
        messages = base
        problems: list[str] = []
        for ask in range(1, self.max_asks + 1):
            self.asks = ask
            try:
                result = await self.client.chat(messages, json_schema=self.schema, schema_name="plan",
                                                max_tokens=self.max_tokens, temperature=0.0)
            except BadCompletion as exc:
                self.tokens += exc.tokens
                problems.append(f"attempt {ask}: {exc}")
                log.warning("plan_unusable", ask=ask, error=str(exc))
                # Only the latest problem goes back: a history of failed plans would crowd a small context.
                messages = [*base, {"role": "user", "content": f"{GOAL_HEADING} {goal}\n\n"
                                                               f"Your previous answer was unusable: {exc}. "
                                                               f"{_hint(exc, self.limits)}"}]
                continue
            self.tokens += result.usage.total_tokens
            try:
                job = parse_job({"goal": goal, "tasks": result.data["tasks"],
                                 "budget": self.budget.model_dump()}, source="plan", capabilities=self.capabilities)
            except JobError as exc:
                problems.append(f"attempt {ask}: invalid plan: {exc}")
                log.warning("plan_invalid", ask=ask, error=str(exc))
                messages = [*base, {"role": "assistant", "content": json.dumps(result.data)},
                            {"role": "user", "content": f"That plan is invalid: {exc}. Return a corrected plan."}]
                continue
            log.info("plan_made", tasks=len(job.tasks), asks=ask)
            return job
        raise PlanError(f"no valid plan for the goal {goal[:80]!r} after {self.max_asks} attempts "
                        f"(max_tokens={self.max_tokens}): " + "; ".join(problems), tuple(problems))


def _hint(exc: BadCompletion, limits: PlanLimits) -> str:
    if exc.finish_reason == "length":
        return (f"It was too long: use at most {limits.max_tasks} tasks, with instructions and descriptions of "
                "one short sentence each.")
    return "Reply with one JSON object that matches the schema, and nothing else."
