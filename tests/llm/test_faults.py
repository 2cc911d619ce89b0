"""Under injected 5xx and hangs, every call still ends well within the client's retries."""

from __future__ import annotations

import anyio
import pytest

from orchestrator.simulator import FaultRates, SimConfig, SimulatedVLLM
from protocol.inference import InferenceClient, InferenceSettings


@pytest.mark.slow
async def test_fifty_calls_survive_5xx_and_timeouts() -> None:
    config = SimConfig(time_scale=0.005, faults=FaultRates(server_error=0.20, hang=0.05), seed=7)
    async with SimulatedVLLM(config) as sim:
        settings = InferenceSettings(url=sim.url, model=sim.model, timeout=1.0, max_retries=8,
                                     backoff_initial=0.02, backoff_max=0.2)
        results: list[str] = []

        async def call(i: int) -> None:
            r = await client.chat([{"role": "user", "content": f"question {i}"}], task_id=f"t{i}", run_id="r")
            results.append(r.text)

        async with InferenceClient(settings) as client:
            with anyio.fail_after(30):
                async with anyio.create_task_group() as tg:
                    for i in range(50):
                        tg.start_soon(call, i)
    assert len(results) == 50
    assert all(results)
    assert sim.stats.faults_injected["server_error"] > 0
    assert sim.stats.faults_injected["hang"] > 0
    assert client.usage.run("r").requests == 50
