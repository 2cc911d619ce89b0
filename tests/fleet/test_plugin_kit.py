"""The plugin kit in ``orchestrator.testing``: run a plugin class against a task in process."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.testing import WorkerHarness, run_worker

PLUGIN = Path(__file__).resolve().parents[2] / "examples" / "slugify-plugin"


@pytest.fixture
def slugify(monkeypatch: pytest.MonkeyPatch) -> type:
    monkeypatch.syspath_prepend(str(PLUGIN))
    from orchestrator_slugify import SlugifyWorker

    return SlugifyWorker


async def test_run_worker_accepts_a_good_answer(slugify: type) -> None:
    result = await run_worker(slugify, "Hello, Fleet!", spec={"expect": "hello-fleet"})
    assert result.accepted, result.reason
    assert result.outputs == {"t": "hello-fleet"}


async def test_run_worker_passes_config_and_reports_failures(slugify: type) -> None:
    result = await run_worker(slugify, "a b", config={"separator": "_"}, spec={"expect": "a-b"}, max_attempts=1)
    assert not result.accepted
    assert result.outputs == {"t": "a_b"}


async def test_worker_harness_gives_llm_workers_the_simulator(worker_harness: WorkerHarness) -> None:
    result = await worker_harness("llm", instruction="Say hello")
    assert result.accepted, result.reason
