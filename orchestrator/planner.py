"""The planner: a goal in, a validated task DAG out, asked of the language model through a JSON schema.

The schema bounds the plan (how many tasks, how long each string) and draws ids, dependencies
and capabilities from fixed lists, so a constrained decoder cannot write an unknown one, and
``max_tokens`` is derived from the schema so that the longest valid plan fits. Repeated tasks are
merged and dependencies that cannot mean anything (on the task itself, on a task the plan
lacks) are dropped, and logged (``plan_repaired``). An unusable answer (cut off, not JSON, not the schema) or an invalid plan (a
cycle, a duplicate id) is sent back to the model with what was wrong, a bounded number of times;
then ``PlanError`` says what went wrong at each attempt.
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
    instruction_length: int = 200
    description_length: int = 120


def plan_schema(capabilities: Collection[str] = ("llm",), limits: PlanLimits | None = None) -> dict[str, Any]:
    """The JSON schema of a plan: bounded in size; ids, dependencies and capabilities from fixed lists.

    Task ids are ``t1`` .. ``t<max_tasks>``, so a dependency can only name a possible task (a small
    model otherwise writes a capability or a word there).
    """
    lim = limits or PlanLimits()
    task_id = {"enum": [f"t{i}" for i in range(1, lim.max_tasks + 1)]}
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
    "You plan work for a team of agents. Split the goal into 1 to {max_tasks} tasks; fewer is better, and a "
    "simple goal needs one task. Each task is one short instruction for one agent, about the goal. Number the "
    "tasks t1, t2, ... in order. depends_on lists the earlier tasks whose results a task needs (t1 needs none). "
    "spec.description says in one sentence what a good result must contain, so a verifier can check it. "
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
        self.repairs: list[str] = []  # what was dropped from the latest answer's dependencies

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
            tasks, self.repairs = _repair(result.data["tasks"])
            if self.repairs:
                log.warning("plan_repaired", ask=ask, repairs=self.repairs)
            try:
                limit = min(self.limits.max_tasks, self.budget.max_tasks or self.limits.max_tasks)
                if len(tasks) > limit:  # the schema says so too, but not every server enforces it
                    raise JobError(f"{len(tasks)} tasks exceed the plan's limit of {limit}", source="plan",
                                   field="tasks")
                job = parse_job({"goal": goal, "tasks": tasks,
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


def _repair(tasks: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """Undo what small models often write and what cannot mean anything else.

    A task whose instruction repeats an earlier one's is merged into it (its dependencies join the
    earlier task's, references to it point there); a dependency on the task itself, on no task of
    the plan, or given twice is dropped. Anything else wrong (a cycle, duplicate ids with different
    instructions) goes back to the model.
    """
    repairs: list[str] = []
    first: dict[str, dict[str, Any]] = {}  # normalized instruction -> the task that keeps it
    alias: dict[str, str] = {}
    kept: list[dict[str, Any]] = []
    for task in tasks:
        key = " ".join(task["instruction"].lower().split())
        if key in first:
            into = first[key]
            if task["id"] != into["id"]:
                alias[task["id"]] = into["id"]
            into["depends_on"] = [*into["depends_on"], *task["depends_on"]]
            repairs.append(f"{task['id']}: merged into {into['id']} (same instruction)")
            continue
        first[key] = {**task, "depends_on": list(task["depends_on"])}
        kept.append(first[key])
    ids = {t["id"] for t in kept}
    for task in kept:
        deps: list[str] = []
        for dep in (alias.get(d, d) for d in task["depends_on"]):
            if dep == task["id"] or dep not in ids or dep in deps:
                why = "itself" if dep == task["id"] else "no task of the plan" if dep not in ids else "repeated"
                repairs.append(f"{task['id']}: dropped dependency {dep!r} ({why})")
            else:
                deps.append(dep)
        task["depends_on"] = deps
    return kept, repairs


def _hint(exc: BadCompletion, limits: PlanLimits) -> str:
    if exc.finish_reason == "length":
        return (f"It was too long: use at most {limits.max_tasks} tasks, with instructions and descriptions of "
                "one short sentence each.")
    return "Reply with one JSON object that matches the schema, and nothing else."
