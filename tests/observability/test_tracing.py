"""OpenTelemetry traces: a worker's span is a child of the manager's attempt span across the bus; off by default."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from orchestrator.api import Orchestrator
from protocol.bus import MemoryBus
from protocol.envelope import Envelope
from protocol.inference_settings import InferenceSettings
from protocol.tracing import Tracing
from tests.observability.fakes import Asker, Echo, Learner, Streamer

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]


class RecordingBus(MemoryBus):
    """A MemoryBus that keeps every envelope published, to look at what travelled."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[Envelope] = []

    async def publish(self, stream: str, envelope: Envelope) -> str:
        self.sent.append(envelope)
        return await super().publish(stream, envelope)


@pytest.fixture
def spans() -> tuple[Tracing, object]:
    sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider), exporter


async def test_worker_span_is_a_child_of_the_dispatch_span_across_the_bus(spans: tuple[Tracing, object]) -> None:
    tracing, exporter = spans
    bus = RecordingBus()
    async with Orchestrator(bus=bus, workers=[Echo, Learner], tracing=tracing) as orch:
        result = await orch.run({"goal": "traced", "tasks": [
            {"id": "a", "capability": "echo", "input": 1},
            {"id": "b", "capability": "learner", "spec": {"expect": "right"}}]})
    assert result.accepted
    finished = exporter.get_finished_spans()  # type: ignore[attr-defined]
    attempts = [s for s in finished if s.name.startswith("attempt ")]
    handlers = [s for s in finished if s.name.startswith("assign ")]
    assert len(attempts) == len(handlers) == 3  # a once, b twice (one redo)
    by_span_id = {s.context.span_id: s for s in attempts}
    for handler in handlers:
        parent = by_span_id[handler.parent.span_id]
        assert handler.context.trace_id == parent.context.trace_id
        assert parent.attributes["orchestrator.task_id"] == handler.attributes["orchestrator.task_id"]
        assert parent.attributes["orchestrator.attempt"] == handler.attributes["orchestrator.attempt"]
    outcomes = sorted(s.attributes["orchestrator.outcome"] for s in attempts)
    assert outcomes == ["accepted", "accepted", "redone"]
    # the context really travelled in the encoded envelope, as W3C traceparent
    assigns = [env for env in bus.sent if env.type == "assign"]
    assert all(env.trace["traceparent"].startswith("00-") for env in assigns)


async def test_llm_calls_are_children_of_the_handler_span(spans: tuple[Tracing, object],
                                                          inference_settings: InferenceSettings) -> None:
    tracing, exporter = spans
    async with Orchestrator(workers=[Asker], llm=inference_settings, tracing=tracing) as orch:
        result = await orch.run({"goal": "ask", "tasks": [{"id": "q", "capability": "asker"}]})
    assert result.accepted
    finished = exporter.get_finished_spans()  # type: ignore[attr-defined]
    handler = next(s for s in finished if s.name == "assign asker")
    llm = [s for s in finished if s.name == "llm /v1/chat/completions"]
    assert llm
    assert llm[-1].parent.span_id == handler.context.span_id
    assert llm[-1].attributes["gen_ai.usage.output_tokens"] > 0


async def test_a_stream_is_one_span_under_the_handler_ended_when_it_ends_or_is_closed(
        spans: tuple[Tracing, object], inference_settings: InferenceSettings) -> None:
    tracing, exporter = spans
    async with Orchestrator(workers=[Streamer], llm=inference_settings, tracing=tracing) as orch:
        result = await orch.run({"goal": "stream", "tasks": [{"id": "s", "capability": "streamer"}]})
    assert result.accepted, result.reason
    finished = exporter.get_finished_spans()  # type: ignore[attr-defined]
    handler = next(s for s in finished if s.name == "assign streamer")
    streams = [s for s in finished if s.attributes.get("llm.stream")]
    assert [s.attributes["llm.outcome"] for s in streams] == ["ok", "cancelled"]
    assert all(s.parent.span_id == handler.context.span_id for s in streams)
    assert streams[0].attributes["gen_ai.usage.output_tokens"] > 0
    assert streams[0].status.is_ok
    assert streams[1].status.is_ok


async def test_the_judges_model_calls_are_under_the_attempt_they_judge(
        spans: tuple[Tracing, object], inference_settings: InferenceSettings) -> None:
    tracing, exporter = spans
    async with Orchestrator(workers=[Echo], llm=inference_settings, tracing=tracing) as orch:
        result = await orch.run({"goal": "judged", "tasks": [
            {"id": "h", "capability": "echo", "input": "25 primes below 100, summing to 1060",
             "spec": {"description": "A headline of at most 60 characters."}}]})
    assert result.accepted, result.reason
    finished = exporter.get_finished_spans()  # type: ignore[attr-defined]
    attempt = next(s for s in finished if s.name == "attempt echo")
    judge = next(s for s in finished if s.name == "judge echo")
    assert judge.parent.span_id == attempt.context.span_id
    assert judge.attributes["orchestrator.verdict"] == "pass"
    calls = [s for s in finished if s.name == "llm /v1/chat/completions"]
    assert [c.parent.span_id for c in calls] == [judge.context.span_id]


async def test_without_configuration_nothing_is_traced_and_envelopes_carry_no_trace(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORCH_TRACING", raising=False)
    bus = RecordingBus()
    async with Orchestrator(bus=bus, workers=[Echo, Learner]) as orch:
        assert not orch.tracing.enabled
        assert not orch.manager.tracing.enabled
        result = await orch.run({"goal": "untraced", "tasks": [
            {"id": "a", "capability": "echo", "input": 1},
            {"id": "b", "capability": "learner", "spec": {"expect": "right"}}]})
    assert result.accepted
    assert bus.sent
    assert all(env.trace == {} for env in bus.sent)


def test_a_run_does_not_import_opentelemetry_unless_asked() -> None:
    """Tracing is an optional extra: with nothing configured, OpenTelemetry is never imported."""
    code = textwrap.dedent("""
        import sys, anyio
        from orchestrator.api import Orchestrator
        from tests.observability.fakes import Echo

        async def main():
            async with Orchestrator(workers=[Echo]) as orch:
                result = await orch.run({"goal": "g", "tasks": [{"id": "a", "capability": "echo", "input": 1}]})
            assert result.accepted
        anyio.run(main)
        assert not [m for m in sys.modules if m.startswith("opentelemetry")], "opentelemetry was imported"
        print("ok")
    """)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
