"""LLM-driven planning, work and verification, end to end against the simulator over real HTTP."""

from __future__ import annotations

import json
from typing import Any

import pytest

from orchestrator import Orchestrator
from orchestrator._schema_bound import CHARS_PER_TOKEN, json_token_bound
from orchestrator.planner import PlanError, PlanLimits, Planner, plan_schema
from orchestrator.simulator import SimConfig, SimulatedVLLM
from orchestrator.simulator.policy import DefaultPolicy, RulesPolicy, SimRequest
from protocol.history import Transitioned
from protocol.inference import InferenceClient
from protocol.inference_settings import InferenceSettings
from tests._history import transitions

pytestmark = pytest.mark.timeout(60)

GOAL = "write a short market brief on heat pumps"


def settings(sim: SimulatedVLLM, **overrides: Any) -> InferenceSettings:
    return InferenceSettings(url=sim.url, model=sim.model, backoff_initial=0.01, backoff_max=0.05, **overrides)


async def test_goal_is_planned_worked_judged_and_redone_until_accepted(sim_llm: SimulatedVLLM) -> None:
    async with Orchestrator(llm=settings(sim_llm)) as orch:
        job = await orch.plan(GOAL)
        assert 3 <= len(job.tasks) <= 4
        assert all(t.capability == "llm" and t.spec.description for t in job.tasks)
        run = await orch.submit(job)
        events = [e async for e in run.events()]
        result = await run.wait()
    assert result.accepted, result.reason
    rejects = [(e, v) for e in events if (v := e.verdict) is not None and not v.passed]
    assert rejects, "the simulated worker's first draft of the brief is sent back"
    assert rejects[0][1].verifier == "llm-judge"
    assert "the spec asks for" in rejects[0][1].feedback  # the judge checks the description's counts
    redone = result.record.tasks[rejects[0][0].task_id]
    assert redone.attempt == 2
    assert redone.output.startswith("Revised answer")
    assert all(t.tokens > 0 for t in result.record.tasks.values())
    assert result.record.tokens >= sum(t.tokens for t in result.record.tasks.values())


async def test_worker_prompt_carries_the_feedback_on_a_redo(sim_llm: SimulatedVLLM) -> None:
    seen: list[str] = []

    def record(request: SimRequest) -> Any:
        seen.append(request.last_user)
        return DefaultPolicy()(request)

    async with SimulatedVLLM(SimConfig(time_scale=0.005), policy=record) as sim, \
            Orchestrator(llm=settings(sim)) as orch:
        result = await orch.run({"goal": "g", "tasks": [
            {"id": "t", "capability": "llm", "instruction": "Write a brief note on tariffs",
             "spec": {"description": "three concrete points"}}]})
    assert result.accepted
    redo_prompts = [p for p in seen if "Verifier feedback:" in p]
    assert len(redo_prompts) == 1
    assert "Give at least three concrete points." in redo_prompts[0]


async def test_fifty_tasks_survive_injected_server_errors_and_timeouts() -> None:
    config = SimConfig(time_scale=0.002, hang_seconds=30, seed=7)
    async with SimulatedVLLM(config) as sim:
        sim.set_fault_rates(server_error=0.2, hang=0.05)
        job = {"goal": "many", "budget": {"max_attempts": 4}, "tasks": [
            {"id": f"t{i}", "capability": "llm", "instruction": f"Explain point {i} about heat pumps",
             "spec": {"description": "a complete answer"}} for i in range(50)]}
        async with Orchestrator(llm=settings(sim, timeout=0.5, max_retries=8), concurrency=50) as orch:
            result = await orch.run(job)
        stats = sim.stats
    assert result.accepted, result.reason
    assert stats.requests_by_status.get(500, 0) > 0


async def test_a_server_that_keeps_failing_fails_the_task_with_the_reason(sim_llm: SimulatedVLLM) -> None:
    sim_llm.set_fault_rates(server_error=1.0)
    async with Orchestrator(llm=settings(sim_llm, max_retries=1)) as orch:
        sim_llm.clear_faults()  # let the start-up check through, then fail every generation
        sim_llm.set_fault_rates(server_error=1.0)
        result = await orch.run({"goal": "g", "tasks": [
            {"id": "t", "capability": "llm", "instruction": "anything", "max_attempts": 2}]})
    assert result.state == "failed"
    assert "500" in result.record.tasks["t"].reason or "server" in result.record.tasks["t"].reason.lower()


async def test_an_empty_answer_is_a_failed_attempt_then_retried(sim_llm: SimulatedVLLM) -> None:
    answers = iter(["", "A complete answer with enough words to pass the judge: one, two, three, four, five, six, "
                        "seven, eight, nine, ten, eleven, twelve, thirteen, fourteen, fifteen, sixteen."])
    policy = RulesPolicy([(r"Instruction:", lambda request, match: next(answers))])
    async with SimulatedVLLM(SimConfig(time_scale=0.005), policy=policy) as sim, \
            Orchestrator(llm=settings(sim)) as orch:
        run = await orch.submit({"goal": "g", "tasks": [{"id": "t", "capability": "llm", "instruction": "x"}]})
        events = [e async for e in run.events()]
        result = await run.wait()
    assert result.accepted, result.reason
    retry = transitions(events, "retry")[0].body
    assert isinstance(retry, Transitioned)
    assert "empty answer" in retry.error


async def test_token_budget_fails_the_run_with_that_reason(sim_llm: SimulatedVLLM) -> None:
    async with Orchestrator(llm=settings(sim_llm)) as orch:
        result = await orch.run({"goal": "g", "budget": {"max_tokens": 50}, "tasks": [
            {"id": "t", "capability": "llm", "instruction": "Explain heat pumps"}]})
    assert result.state == "failed"
    assert "token budget spent" in result.reason


async def test_planner_reasks_with_the_validation_error_then_succeeds() -> None:
    plans = iter([
        {"tasks": [{"id": "t1", "capability": "llm", "instruction": "x", "depends_on": ["t2"],
                    "spec": {"description": "d"}},
                   {"id": "t2", "capability": "llm", "instruction": "y", "depends_on": ["t1"],
                    "spec": {"description": "d"}}]},
        {"tasks": [{"id": "t1", "capability": "llm", "instruction": "x", "depends_on": [],
                    "spec": {"description": "d"}}]},
    ])
    prompts: list[str] = []

    def planner(request: SimRequest, match: Any) -> Any:
        prompts.append(request.last_user)
        return next(plans)

    policy = RulesPolicy([(r"Goal:|invalid", planner)])
    async with SimulatedVLLM(SimConfig(time_scale=0.005), policy=policy) as sim, \
            InferenceClient(settings(sim)) as client:
        job = await Planner(client, capabilities={"llm"}).plan("a goal")
    assert [t.id for t in job.tasks] == ["t1"]
    assert "dependency cycle t1 -> t2 -> t1" in prompts[1]


async def test_planner_merges_repeated_tasks_and_drops_dependencies_that_mean_nothing() -> None:
    plan = {"tasks": [
        {"id": "t1", "capability": "llm", "instruction": "Write a haiku", "depends_on": ["t1", "t2", "t5"],
         "spec": {"description": "d"}},
        {"id": "t2", "capability": "llm", "instruction": "Gather facts", "depends_on": [], "spec": {"description": "d"}},
        {"id": "t3", "capability": "llm", "instruction": "write a  HAIKU", "depends_on": ["t2"],
         "spec": {"description": "d"}},
        {"id": "t4", "capability": "llm", "instruction": "Polish it", "depends_on": ["t3", "t1"],
         "spec": {"description": "d"}}]}
    async with SimulatedVLLM(SimConfig(time_scale=0.005), policy=RulesPolicy([(r"Goal:", plan)])) as sim, \
            InferenceClient(settings(sim)) as client:
        planner = Planner(client, capabilities={"llm"})
        job = await planner.plan("a goal")
    assert {t.id: t.depends_on for t in job.tasks} == {"t1": ("t2",), "t2": (), "t4": ("t1",)}
    assert planner.asks == 1
    assert planner.repairs == ["t3: merged into t1 (same instruction)", "t1: dropped dependency 't1' (itself)",
                               "t1: dropped dependency 't5' (no task of the plan)",
                               "t1: dropped dependency 't2' (repeated)", "t4: dropped dependency 't1' (repeated)"]


async def test_planner_gives_up_after_its_bounded_attempts() -> None:
    cycle = {"tasks": [
        {"id": "t1", "capability": "llm", "instruction": "x", "depends_on": ["t2"], "spec": {"description": "d"}},
        {"id": "t2", "capability": "llm", "instruction": "y", "depends_on": ["t1"], "spec": {"description": "d"}}]}
    async with SimulatedVLLM(SimConfig(time_scale=0.005), policy=RulesPolicy([(r".", cycle)])) as sim, \
            InferenceClient(settings(sim)) as client:
        with pytest.raises(PlanError, match=r"after 2 attempts.*attempt 1: invalid plan.*attempt 2: invalid plan") as err:
            await Planner(client, capabilities={"llm"}, max_asks=2).plan("a goal")
    assert len(err.value.problems) == 2


async def test_plan_schema_is_bounded_and_names_only_the_capabilities_served() -> None:
    schema = plan_schema(["llm", "python"], PlanLimits(max_tasks=4, instruction_length=100))
    task = schema["properties"]["tasks"]["items"]
    assert schema["properties"]["tasks"]["maxItems"] == 4
    assert task["properties"]["capability"] == {"enum": ["llm", "python"]}
    assert task["properties"]["instruction"]["maxLength"] == 100
    smaller, default = json_token_bound(schema), json_token_bound(plan_schema())
    assert smaller is not None
    assert default is not None
    assert smaller < default


async def test_a_cut_off_plan_is_reasked_with_the_reason_and_the_error_lists_every_attempt() -> None:
    prompts: list[str] = []

    def planner(request: SimRequest, match: Any) -> Any:
        prompts.append(request.last_user)
        return DefaultPolicy.plan("a goal")

    async with SimulatedVLLM(SimConfig(time_scale=0.005), policy=RulesPolicy([(r"Goal:", planner)])) as sim, \
            InferenceClient(settings(sim)) as client:
        planner_ = Planner(client, capabilities={"llm"}, max_tokens=10)
        with pytest.raises(PlanError) as err:
            await planner_.plan("a goal")
    message = str(err.value)
    assert "after 3 attempts (max_tokens=10)" in message
    assert message.count("cut off by max_tokens=10") == 3
    assert "Your previous answer was unusable" in prompts[1]
    assert "too long: use at most 5 tasks" in prompts[1]
    assert planner_.tokens > 0


async def test_planner_max_tokens_fits_the_longest_plan_the_schema_allows(sim_llm: SimulatedVLLM) -> None:
    async with InferenceClient(settings(sim_llm)) as client:
        planner = Planner(client)
    longest = {"tasks": [{"id": "t5", "capability": "llm", "instruction": "word " * 40,
                          "depends_on": ["t1", "t2", "t3", "t4"], "spec": {"description": "word " * 24}}] * 5}
    text = json.dumps(longest, separators=(",", ":"))  # whitespace has its own allowance, per separator
    assert len(text) <= CHARS_PER_TOKEN * planner.max_tokens
    assert planner.max_tokens + 400 <= 2048, "the plan and its prompt fit a 2048-token context"


async def test_llm_tasks_without_a_model_are_rejected_with_a_clear_message() -> None:
    async with Orchestrator() as orch:
        with pytest.raises(Exception, match="capability 'llm' needs a language model"):
            await orch.submit({"goal": "g", "tasks": [{"id": "t", "capability": "llm", "instruction": "x"}]})
