"""vLLM 0.33's extra surface on the simulator: metric names, request ids, /tokenizer_info, /invocations,
/openapi.json and a minimal /v1/responses (through the openai SDK)."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import httpx
import openai
import pytest

from orchestrator.simulator import SimConfig, SimulatedVLLM
from orchestrator.testing import held_in_task

HELLO = [{"role": "user", "content": "hello"}]

# vllm:* series vLLM 0.33 exports by default (v1/metrics/loggers.py), as scraped (counters with _total).
VLLM_033_METRICS = (
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:num_requests_waiting_by_reason",
    "vllm:engine_sleep_state", "vllm:kv_cache_usage_perc", "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total", "vllm:external_prefix_cache_queries_total",
    "vllm:external_prefix_cache_hits_total", "vllm:mm_cache_queries_total", "vllm:mm_cache_hits_total",
    "vllm:corrupted_requests_total", "vllm:num_preemptions_total", "vllm:prompt_tokens_total",
    "vllm:prompt_tokens_by_source_total", "vllm:prompt_tokens_cached_total", "vllm:generation_tokens_total",
    "vllm:request_success_total", "vllm:admission_rejections_total", "vllm:iteration_tokens_total_bucket",
    "vllm:request_prompt_tokens_bucket", "vllm:request_generation_tokens_bucket",
    "vllm:request_max_num_generation_tokens_bucket", "vllm:request_params_n_bucket",
    "vllm:request_params_max_tokens_bucket", "vllm:request_prefill_kv_computed_tokens_bucket",
    "vllm:request_num_preemptions_bucket", "vllm:time_to_first_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket", "vllm:request_time_per_output_token_seconds_bucket",
    "vllm:e2e_request_latency_seconds_bucket", "vllm:request_queue_time_seconds_bucket",
    "vllm:request_inference_time_seconds_bucket", "vllm:request_prefill_time_seconds_bucket",
    "vllm:request_decode_time_seconds_bucket", "vllm:cache_config_info", "vllm:lora_requests_info",
)


@pytest.fixture
async def sim() -> AsyncIterator[SimulatedVLLM]:
    config = SimConfig(time_scale=0.002, enable_request_id_headers=True, enable_tokenizer_info_endpoint=True)
    async with held_in_task(SimulatedVLLM(config)) as sim:
        yield sim


async def test_metric_names_of_vllm_033(sim: SimulatedVLLM) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        await http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 5})
        text = (await http.get("/metrics")).text
    names = {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and line[0] != "#"}
    assert set(VLLM_033_METRICS) <= names
    count = next(line for line in text.splitlines() if line.startswith("vllm:request_generation_tokens_count"))
    assert float(count.split()[-1]) == 1
    for line in text.splitlines():  # every sample parses as Prometheus text
        if line and not line.startswith("#"):
            assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*(\{[^}]*\})? ([0-9.e+-]+|\+Inf|NaN)", line), line


async def test_request_id_header_is_echoed_and_names_the_completion(sim: SimulatedVLLM) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        r = await http.post("/v1/chat/completions", json={"messages": HELLO}, headers={"X-Request-Id": "req-7"})
        generated = await http.get("/v1/models")
    assert r.headers["x-request-id"] == "req-7"
    assert r.json()["id"] == "chatcmpl-req-7"
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"])


async def test_no_request_id_header_nor_tokenizer_info_without_the_flags(sim_llm: SimulatedVLLM) -> None:
    async with httpx.AsyncClient(base_url=sim_llm.url) as http:
        r = await http.post("/v1/chat/completions", json={"messages": HELLO}, headers={"X-Request-Id": "req-8"})
        info = await http.get("/tokenizer_info")
    assert "x-request-id" not in r.headers
    assert r.json()["id"] == "chatcmpl-req-8"  # the id still comes from the header, as in vLLM
    assert info.status_code == 404  # only with --enable-tokenizer-info-endpoint


async def test_tokenizer_info_invocations_openapi(sim: SimulatedVLLM) -> None:
    async with httpx.AsyncClient(base_url=sim.url) as http:
        info = (await http.get("/tokenizer_info")).json()
        chat = await http.post("/invocations", json={"messages": HELLO})
        completion = await http.post("/invocations", json={"prompt": "hi", "max_tokens": 3})
        neither = await http.post("/invocations", json={"foo": 1})
        spec = (await http.get("/openapi.json")).json()
    assert info["vocab_size"] == sim.config.vocab_size
    assert info["model_max_length"] == sim.config.max_model_len
    assert chat.json()["object"] == "chat.completion"
    assert completion.json()["object"] == "text_completion"
    assert neither.status_code == 400
    assert spec["openapi"].startswith("3.")
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models", "/health"} <= set(spec["paths"])
    assert not any(p.startswith("/_sim") for p in spec["paths"])


async def test_responses_through_the_sdk(sim: SimulatedVLLM) -> None:
    async with openai.AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="x", max_retries=0) as client:
        resp = await client.responses.create(model=sim.model, input="Say hello", instructions="Be brief.",
                                             max_output_tokens=64)
        assert resp.status == "completed"
        assert resp.output_text
        assert resp.usage is not None
        assert resp.usage.total_tokens == resp.usage.input_tokens + resp.usage.output_tokens
        cut = await client.responses.create(model=sim.model, input="Say hello", max_output_tokens=2)
        assert cut.status == "incomplete"
        assert cut.usage is not None
        assert cut.usage.output_tokens == 2
        with pytest.raises(openai.NotFoundError):
            await client.responses.create(model="nope", input="x")


@pytest.mark.parametrize("dev_mode", [False, True])
async def test_reset_prefix_cache_is_a_dev_mode_route_as_in_vllm(dev_mode: bool) -> None:
    async with SimulatedVLLM(SimConfig(time_scale=0.005, server_dev_mode=dev_mode)) as sim, \
            httpx.AsyncClient(base_url=sim.url) as http:
        r = await http.post("/reset_prefix_cache")
        paths = (await http.get("/openapi.json")).json()["paths"]
    assert r.status_code == (200 if dev_mode else 404)
    assert ("/reset_prefix_cache" in paths) is dev_mode
