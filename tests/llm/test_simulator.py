"""The simulator's own behaviour: batching, prefix cache, metrics, roles, faults, endpoints."""

from __future__ import annotations

import json

import anyio
import httpx
import pytest

from orchestrator.simulator import DefaultPolicy, LatencyModel, SimConfig, SimulatedVLLM
from orchestrator.simulator.kv import BlockPool
from protocol.inference import InferenceClient, InferenceSettings
from protocol.prompts import build_messages
from protocol.roles import ANSWER_HEADING, FEEDBACK_HEADING, GOAL_HEADING, ROLE_JUDGE, ROLE_PLANNER, ROLE_WORKER

HELLO = [{"role": "user", "content": "hello"}]


def _settings(sim: SimulatedVLLM, **kw: object) -> InferenceSettings:
    return InferenceSettings.model_validate({"url": sim.url, "model": sim.model, "timeout": 10.0,
                                             "backoff_initial": 0.01, "backoff_max": 0.05, **kw})


async def test_continuous_batching_caps_running_and_queues() -> None:
    config = SimConfig(time_scale=0.5, max_num_seqs=4)
    loads = []
    async with SimulatedVLLM(config) as sim, InferenceClient(_settings(sim)) as client, \
            anyio.create_task_group() as tg:
        for _ in range(16):
            tg.start_soon(client.chat, HELLO)
        for _ in range(5):
            await anyio.sleep(0.01)
            loads.append(await client.server_load())
    assert max(load.running for load in loads) == 4
    assert max(load.waiting for load in loads) > 0
    assert sim.stats.max_batch_size == 4
    assert sim.stats.max_waiting >= 8
    assert sim.stats.completed == 16


async def test_throughput_rises_with_concurrency_then_plateaus() -> None:
    config = SimConfig(time_scale=0.5, max_num_seqs=8)
    results = {}
    for n in (1, 8, 32):
        async with SimulatedVLLM(config) as sim, InferenceClient(_settings(sim)) as client:
            start = anyio.current_time()
            async with anyio.create_task_group() as tg:
                for _ in range(n):
                    tg.start_soon(client.chat, HELLO)
            results[n] = n / (anyio.current_time() - start)
    assert results[8] > 3 * results[1]
    assert results[32] < 2 * results[8]


async def test_prefix_cache_hits_and_metrics() -> None:
    config = SimConfig(time_scale=0.005, enable_prompt_tokens_details=True)
    async with SimulatedVLLM(config) as sim, InferenceClient(_settings(sim)) as client:
        system = "Shared preamble for every agent. " * 30
        first = await client.chat(build_messages(system=system, variable="one"))
        second = await client.chat(build_messages(system=system, variable="two"))
        assert first.usage.cached_tokens == 0
        assert second.usage.cached_tokens >= 0.8 * first.usage.prompt_tokens - 16
        text = (await client.http.get("/metrics")).text
    hits = next(line for line in text.splitlines() if line.startswith("vllm:prefix_cache_hits_total"))
    assert float(hits.split()[-1]) == sim.stats.prefix_cache_hits > 0
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:prefix_cache_queries_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:e2e_request_latency_seconds_count"):
        assert name in text


async def test_prefix_hits_cut_time_to_answer() -> None:
    slow_prefill = LatencyModel(prefill_s_per_token=0.002)
    async with SimulatedVLLM(SimConfig(time_scale=0.05, latency=slow_prefill)) as sim, \
            InferenceClient(_settings(sim)) as client:
        system = "A long shared system prompt. " * 60
        t0 = anyio.current_time()
        await client.chat(build_messages(system=system, variable="a"), max_tokens=2)
        cold = anyio.current_time() - t0
        t0 = anyio.current_time()
        await client.chat(build_messages(system=system, variable="b"), max_tokens=2)
        warm = anyio.current_time() - t0
    assert warm < cold / 2


def test_block_pool_evicts_idle_cached_blocks() -> None:
    pool = BlockPool(4)
    assert pool.allocate(2)
    pool.promote([1, 2])
    pool.release([1, 2], 0)
    assert pool.free == 4
    assert pool.match([1, 2], 2) == 2
    assert pool.allocate(4)  # evicts both idle cached blocks
    assert pool.match([1, 2], 2) == 0


async def test_preemption_when_kv_is_small() -> None:
    config = SimConfig(time_scale=0.005, kv_cache_tokens=16 * 12, block_size=16, max_model_len=180)
    async with SimulatedVLLM(config) as sim, InferenceClient(_settings(sim)) as client, \
            anyio.create_task_group() as tg:
        for i in range(6):
            msgs = [{"role": "user", "content": f"request {i} " + "pad " * 30}]
            tg.start_soon(lambda m=msgs: client.chat(m, max_tokens=60))
    assert sim.stats.preemptions > 0
    assert sim.stats.completed == 6


async def test_default_policy_plays_three_roles(inference_client: InferenceClient) -> None:
    plan = await inference_client.chat(
        build_messages(system="You plan work.", role=ROLE_PLANNER, variable=f"{GOAL_HEADING} write a city guide"),
    )
    tasks = json.loads(plan.text)["tasks"]
    assert 3 <= len(tasks) <= 4
    assert {"id", "capability", "instruction", "depends_on", "spec"} <= set(tasks[0])
    brief = next(t for t in tasks if "brief" in t["instruction"])

    def worker(variable: str) -> list[dict[str, object]]:
        return build_messages(system="You do tasks.", role=ROLE_WORKER, spec=brief["spec"], variable=variable)

    draft = (await inference_client.chat(worker(f"Instruction: {brief['instruction']}"))).text
    judge_msgs = build_messages(system="You verify.", role=ROLE_JUDGE, spec=brief["spec"],
                                variable=f"{ANSWER_HEADING}\n{draft}")
    verdict = json.loads((await inference_client.chat(judge_msgs)).text)
    assert verdict["passed"] is False
    assert verdict["corrections"]

    redo = worker(f"Instruction: {brief['instruction']}\n\n{FEEDBACK_HEADING} {'; '.join(verdict['corrections'])}")
    improved = (await inference_client.chat(redo)).text
    judge_msgs = build_messages(system="You verify.", role=ROLE_JUDGE, spec=brief["spec"],
                                variable=f"{ANSWER_HEADING}\n{improved}")
    assert json.loads((await inference_client.chat(judge_msgs)).text)["passed"] is True


def test_planner_is_deterministic() -> None:
    assert DefaultPolicy.plan("x") == DefaultPolicy.plan("x")


async def test_endpoints_say_simulated(sim_llm: SimulatedVLLM) -> None:
    async with httpx.AsyncClient(base_url=sim_llm.url) as http:
        version = (await http.get("/version")).json()
        assert version["simulated"] is True
        assert "simulator" in version["version"]
        tok = (await http.post("/tokenize", json={"prompt": "Hello, simulated world!"})).json()
        assert tok["count"] == len(tok["tokens"]) > 0
        detok = (await http.post("/detokenize", json={"tokens": tok["tokens"]})).json()
        assert detok["prompt"] == "Hello, simulated world!"
        assert (await http.get("/nope")).json() == {"detail": "Not Found"}
        assert (await http.get("/health")).status_code == 200
        sim_llm.kill_engine()
        assert (await http.get("/health")).status_code == 503
        sim_llm.revive_engine()
        assert (await http.get("/health")).status_code == 200


async def test_auth_guards_only_v1() -> None:
    async with SimulatedVLLM(SimConfig(api_keys=("k",))) as sim, httpx.AsyncClient(base_url=sim.url) as http:
        r = await http.get("/v1/models")
        assert r.status_code == 401
        assert r.json() == {"error": "Unauthorized"}
        assert (await http.get("/v1/models", headers={"Authorization": "bearer k"})).status_code == 200
        assert (await http.get("/metrics")).status_code == 200
        assert (await http.post("/tokenize", json={"prompt": "x"})).status_code == 200


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"messages": HELLO, "top_logprobs": 2}, "logprobs"),
        ({"messages": HELLO, "structured_outputs": {"json": {}, "regex": "a"}}, "one kind"),
        ({"messages": HELLO, "tool_choice": "auto", "tools": [{"type": "function", "function": {"name": "f"}}]},
         "--enable-auto-tool-choice"),
        ({"messages": HELLO, "response_format": {"type": "json_schema"}}, "json_schema"),
        ({"messages": "nope"}, "validation error"),
        ({"messages": HELLO, "max_tokens": "ten"}, "validation error"),
    ],
)
async def test_validation_400s(sim_llm: SimulatedVLLM, body: dict[str, object], fragment: str) -> None:
    async with httpx.AsyncClient(base_url=sim_llm.url) as http:
        r = await http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == 400
    assert fragment in err["message"]


@pytest.mark.parametrize("sim_config", [SimConfig(time_scale=0.005, sim_admin=True)])
async def test_fault_admin_endpoint(sim_llm: SimulatedVLLM) -> None:
    async with httpx.AsyncClient(base_url=sim_llm.url) as http:
        await http.post("/_sim/faults", json={"script": ["server_error"]})
        assert (await http.post("/v1/chat/completions", json={"messages": HELLO})).status_code == 500
        assert (await http.post("/v1/chat/completions", json={"messages": HELLO})).status_code == 200
        state = (await http.get("/_sim/state")).json()
    assert state["faults_injected"] == {"server_error": 1}
    assert state["completed"] == 1


def test_cli_parser_builds_a_config() -> None:
    from orchestrator.simulator.cli import build_parser

    args = build_parser().parse_args(["--port", "8123", "--api-key", "a", "--max-num-seqs", "64",
                                      "--time-scale", "0.1", "--fault-5xx", "0.2"])
    assert (args.port, args.api_key, args.max_num_seqs, args.time_scale, args.fault_5xx) == (8123, ["a"], 64, 0.1,
                                                                                              0.2)
