"""The Prometheus endpoint, scraped over real HTTP, agrees with the run's own history."""

from __future__ import annotations

from collections import Counter
from contextlib import aclosing

import anyio
import httpx
import pytest

from orchestrator.api import Orchestrator
from orchestrator.simulator import SimulatedVLLM
from protocol.bus import MemoryBus
from protocol.envelope import Envelope
from protocol.inference import InferenceClient
from protocol.keys import results_stream, tasks_stream, workers_group
from protocol.messages import Assign
from tests.observability.fakes import JOB, Broken, Echo, Gate, Learner

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402 - after the skip

from orchestrator.metrics import ManagerMetrics  # noqa: E402
from protocol.history import Dispatched, Transitioned  # noqa: E402
from protocol.metrics import InferenceMetrics, WorkerMetrics, serve_metrics  # noqa: E402
from tests._history import of, transitions, verdicts  # noqa: E402
from workers.runtime import WorkerRuntime  # noqa: E402

pytestmark = pytest.mark.timeout(30)

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient() as client:
        resp = await client.get(url)
    assert resp.status_code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for s in family.samples:
            samples[s.name, frozenset(s.labels.items())] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every series of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


async def test_scraped_counters_match_the_runs_events() -> None:
    Gate.open, Gate.entered = anyio.Event(), anyio.Event()
    async with Orchestrator(workers=[Echo, Learner, Broken, Gate], metrics_port=0) as orch:
        assert orch.metrics_url.startswith("http://127.0.0.1:")
        run = await orch.submit(JOB)
        with anyio.fail_after(10):
            await Gate.entered.wait()
        during = await scrape(orch.metrics_url)  # d is in its handler; the run is not over
        assert value(during, "orchestrator_worker_in_flight", capability="gate") == 1
        assert value(during, "orchestrator_tasks", capability="gate", state="not_done") == 1
        assert value(during, "orchestrator_runs", state="running") == 1
        Gate.open.set()
        result = await run.wait()
        events = [e async for e in run.events()]
        after = await scrape(orch.metrics_url)

    assert str(result.state) == "failed"
    moves = [e.body for e in transitions(events)]
    by_event = Counter(str(m.event) for m in moves if isinstance(m, Transitioned))
    assert by_event["reject"] == 1
    assert by_event["exhaust"] == 1
    for name, count in by_event.items():
        assert total(after, "orchestrator_task_transitions_total", event=name) == count, name
    for (name, before, to), count in Counter((str(m.event), str(m.from_state), str(m.to_state)) for m in moves
                                             if isinstance(m, Transitioned)).items():
        assert value(after, "orchestrator_task_transitions_total", event=name, from_state=before, to_state=to) == count
    assert total(after, "orchestrator_task_redos_total") == by_event["reject"]
    # One per verdict given; a task whose spec has no checks passes without one.
    assert total(after, "orchestrator_verifications_total", outcome="pass") == len(verdicts(events, passed=True))
    assert total(after, "orchestrator_verifications_total", outcome="reject") == by_event["reject"]
    assert total(after, "orchestrator_task_dispatches_total") == len(of(events, Dispatched))

    tasks = result.record.tasks.values()
    accepted = [t for t in tasks if str(t.state) == "accepted"]
    for capability in ("echo", "learner", "broken", "gate"):
        for state in ("accepted", "failed", "not_done", "redo"):
            expected = sum(1 for t in tasks if t.capability == capability and str(t.state) == state)
            assert value(after, "orchestrator_tasks", capability=capability, state=state) == expected
    assert total(after, "orchestrator_task_attempts_count") == len(accepted) == 3
    assert total(after, "orchestrator_task_attempts_sum") == sum(t.attempt for t in accepted) == 4
    assert value(after, "orchestrator_task_attempts_bucket", capability="learner", le="1.0") == 0
    assert value(after, "orchestrator_task_attempts_bucket", capability="learner", le="2.0") == 1
    assert total(after, "orchestrator_task_latency_seconds_count") == len(accepted)
    assert value(after, "orchestrator_runs", state="failed") == 1
    assert value(after, "orchestrator_runs", state="running") == 0

    # the hosted worker's side of the same run
    assert value(after, "orchestrator_worker_tasks_handled_total", capability="learner", outcome="done") == 2
    assert value(after, "orchestrator_worker_tasks_handled_total", capability="broken", outcome="failed") == 1
    assert total(after, "orchestrator_worker_handler_duration_seconds_count") == 5
    assert total(after, "orchestrator_worker_in_flight") == 0


async def test_queue_depth_and_dead_letters_come_from_the_bus() -> None:
    registry = prometheus_client.CollectorRegistry()
    metrics = ManagerMetrics(registry)
    bus = MemoryBus()
    for _ in range(3):
        await bus.publish(tasks_stream("echo"), Envelope(body=Assign(capability="echo", instruction="")))
    await bus.publish_frame(results_stream("echo"), b"not a frame")
    results = bus.consume(results_stream("echo"), group="g", consumer="c")
    with anyio.move_on_after(0.1):  # the garbage is dead-lettered on the way, nothing is yielded
        await anext(aiter(results))
    await metrics.refresh_bus(bus, ["echo"])
    assert registry.get_sample_value("orchestrator_queue_depth", {"capability": "echo"}) == 3
    assert registry.get_sample_value("orchestrator_dead_letters", {"stream": results_stream("echo")}) == 1
    assert registry.get_sample_value("orchestrator_dead_letters", {"stream": tasks_stream("echo")}) == 0
    deliveries = bus.consume(tasks_stream("echo"), group=workers_group("echo"), consumer="w")
    await bus.ack(await anext(aiter(deliveries)))
    await metrics.refresh_bus(bus, ["echo"])
    assert registry.get_sample_value("orchestrator_queue_depth", {"capability": "echo"}) == 2


async def test_worker_metrics_count_outcomes_and_in_flight() -> None:
    registry = prometheus_client.CollectorRegistry()
    Gate.open, Gate.entered = anyio.Event(), anyio.Event()
    server = serve_metrics(0, registry, host="127.0.0.1")
    try:
        async with Orchestrator(workers=[], host_workers=False) as orch:
            runtime = WorkerRuntime(orch.bus, {"echo": Echo(), "broken": Broken(), "gate": Gate()},
                                    observers=[WorkerMetrics(registry)])
            async with runtime.running():
                run = await orch.submit({**JOB, "tasks": [t for t in JOB["tasks"] if t["capability"] != "learner"]})
                with anyio.fail_after(10):
                    await Gate.entered.wait()
                during = await scrape(server.url)
                assert value(during, "orchestrator_worker_in_flight", capability="gate") == 1
                Gate.open.set()
                await run.wait()
            after = await scrape(server.url)
    finally:
        server.close()
    assert value(after, "orchestrator_worker_tasks_handled_total", capability="echo", outcome="done") == 1
    assert value(after, "orchestrator_worker_tasks_handled_total", capability="broken", outcome="failed") == 1
    assert value(after, "orchestrator_worker_tasks_handled_total", capability="gate", outcome="done") == 1
    assert value(after, "orchestrator_worker_handler_duration_seconds_count", capability="gate") == 1
    assert value(after, "orchestrator_worker_in_flight", capability="gate") == 0


async def test_llm_metrics_against_the_simulator(inference_client: InferenceClient) -> None:
    registry = prometheus_client.CollectorRegistry()
    inference_client.observer = InferenceMetrics(registry)
    for _ in range(2):
        await inference_client.chat([{"role": "user", "content": "count to three"}], max_tokens=16,
                                    run_id="r", task_id="t")
    usage = inference_client.usage.task("r", "t")
    labels = {"endpoint": "/v1/chat/completions", "status": "200", "outcome": "ok"}
    assert registry.get_sample_value("orchestrator_llm_requests_total", labels) == 2
    assert registry.get_sample_value("orchestrator_llm_tokens_total", {"kind": "prompt"}) == usage.prompt_tokens > 0
    assert registry.get_sample_value("orchestrator_llm_tokens_total",
                                     {"kind": "completion"}) == usage.completion_tokens > 0
    assert registry.get_sample_value("orchestrator_llm_request_duration_seconds_count",
                                     {"endpoint": "/v1/chat/completions"}) == 2


async def test_llm_retries_and_failed_requests_are_counted(sim_llm: SimulatedVLLM,
                                                         inference_client: InferenceClient) -> None:
    registry = prometheus_client.CollectorRegistry()
    inference_client.observer = InferenceMetrics(registry)
    sim_llm.script_faults(["unavailable"])  # the first try gets a 503, the retry an answer
    result = await inference_client.chat([{"role": "user", "content": "hi"}], max_tokens=8,
                                         run_id="r", task_id="t")
    assert result.text
    assert registry.get_sample_value("orchestrator_llm_retries_total") == 1
    assert registry.get_sample_value("orchestrator_llm_requests_total", {
        "endpoint": "/v1/chat/completions", "status": "503", "outcome": "unavailable"}) == 1
    assert registry.get_sample_value("orchestrator_llm_requests_total", {
        "endpoint": "/v1/chat/completions", "status": "200", "outcome": "ok"}) == 1
    assert registry.get_sample_value("orchestrator_llm_tokens_total",
                                     {"kind": "prompt"}) == inference_client.usage.task("r", "t").prompt_tokens


async def test_streamed_requests_are_counted_like_the_others(sim_llm: SimulatedVLLM,
                                                             inference_client: InferenceClient) -> None:
    registry = prometheus_client.CollectorRegistry()
    inference_client.observer = InferenceMetrics(registry)
    hello = [{"role": "user", "content": "count to three"}]
    sim_llm.script_faults(["server_error"])  # retried before the first delta
    events = [e async for e in inference_client.stream_chat(hello, max_tokens=16, run_id="r", task_id="t")]
    async with aclosing(inference_client.stream_chat(hello, max_tokens=16)) as stream:
        async for _ in stream:
            break  # the caller stops reading after the first delta

    def requests(status: str, outcome: str) -> float | None:
        return registry.get_sample_value("orchestrator_llm_requests_total", {
            "endpoint": "/v1/chat/completions", "status": status, "outcome": outcome})

    assert requests("500", "unavailable") == 1
    assert requests("200", "ok") == 1
    assert requests("200", "cancelled") == 1
    assert registry.get_sample_value("orchestrator_llm_request_duration_seconds_count",
                                     {"endpoint": "/v1/chat/completions"}) == 3
    assert events[-1].usage is not None
    assert registry.get_sample_value("orchestrator_llm_tokens_total",
                                     {"kind": "completion"}) == events[-1].usage.completion_tokens > 0
