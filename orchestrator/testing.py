"""The plugin kit: pytest fixtures and helpers for testing workers and code that calls the LLM.

Use as a plugin (``pytest_plugins = ["orchestrator.testing"]`` in your root conftest) or import
the fixtures into a conftest. Override ``sim_config`` / ``inference_settings`` to tune them.

- ``sim_llm``: a simulated vLLM server on a free port; ``inference_settings`` / ``inference_client``
  point at it.
- ``run_worker(worker, input_or_task)``: run one task through a worker class in process (manager,
  in-memory bus, the worker's own ``verify``) and get a :class:`~orchestrator.api.RunResult`.
- ``worker_harness``: a fixture that is ``run_worker`` with the simulator wired in for workers
  that need a model.
- ``real_llm``: llama.cpp's ``llama-server`` with SmolLM2-135M (built once by ``scripts/real-model``),
  one per test session; tests that use it skip, with the reason, when that cache is absent. Mark
  them ``realmodel``.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol, TypeVar

import pytest

from orchestrator.api import Orchestrator, RunResult
from orchestrator.real_model import LlamaServer, RealModel, RealModelUnavailable
from orchestrator.simulator import SimConfig, SimulatedVLLM
from protocol.inference import InferenceClient, InferenceSettings
from workers.base import Worker

__all__ = ("WorkerHarness", "held_in_task", "inference_client", "inference_settings", "real_llm", "run_worker",
           "sim_config", "sim_llm", "worker_harness")

T = TypeVar("T")


@asynccontextmanager
async def held_in_task(cm: AbstractAsyncContextManager[T]) -> AsyncIterator[T]:
    """Enter and exit ``cm`` inside one dedicated task.

    pytest-asyncio runs a fixture's setup and teardown in different tasks, but an anyio task group
    (the simulator's) must be exited by the task that entered it. This is the one place that spawns
    a bare asyncio task, because the fixture has no task group that outlives the yield.
    """
    entered: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    stop = asyncio.Event()

    async def hold() -> None:
        try:
            async with cm as value:
                entered.set_result(value)
                await stop.wait()
        except BaseException as exc:
            if not entered.done():
                entered.set_exception(exc)
            raise

    task = asyncio.get_running_loop().create_task(hold())
    try:
        yield await entered
    finally:
        stop.set()
        await task


@pytest.fixture
def sim_config() -> SimConfig:
    """Simulator settings: 200x faster than real time."""
    return SimConfig(time_scale=0.005)


@pytest.fixture
async def sim_llm(sim_config: SimConfig) -> AsyncIterator[SimulatedVLLM]:
    """A simulated vLLM server on a free local port."""
    async with held_in_task(SimulatedVLLM(sim_config)) as sim:
        yield sim


@pytest.fixture
def inference_settings(sim_llm: SimulatedVLLM) -> InferenceSettings:
    """Client settings for ``sim_llm``: short timeouts and fast backoff."""
    key = sim_llm.config.api_keys[0] if sim_llm.config.api_keys else None
    return InferenceSettings(url=sim_llm.url, model=sim_llm.model, api_key=key, timeout=10.0,
                             backoff_initial=0.01, backoff_max=0.1)


@pytest.fixture
async def inference_client(inference_settings: InferenceSettings) -> AsyncIterator[InferenceClient]:
    """An open ``InferenceClient`` talking to ``sim_llm``."""
    async with InferenceClient(inference_settings) as client:
        yield client


async def run_worker(worker: type[Worker] | Worker | str, input: Any = None, *, instruction: str = "",
                     spec: Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None,
                     max_attempts: int = 3, llm: InferenceSettings | None = None,
                     task: Mapping[str, Any] | None = None) -> RunResult:
    """Run one task through ``worker`` in process and return how it ended.

    ``config`` builds the worker with that config (validated by its ``config_model``). The worker
    is hosted by an ``Orchestrator`` on the in-memory bus, exactly as in a fleet: the
    manager checks ``spec`` (``expect``, ``schema``, ...) and then the worker's own ``verify``, and
    sends failures back for redo up to ``max_attempts``. ``task`` gives the whole task definition
    instead (its ``capability`` defaults to the worker's). ``llm`` is needed for workers with
    ``needs_inference`` (use the ``worker_harness`` fixture to get the simulator's).
    """
    cls = worker if isinstance(worker, type | str) else type(worker)
    if isinstance(cls, str):
        from workers import registry

        cls = registry.load(cls)
    definition: dict[str, Any] = {"id": "t", "capability": cls.capability, "max_attempts": max_attempts}
    if input is not None:
        definition["input"] = input
    if instruction:
        definition["instruction"] = instruction
    if spec is not None:
        definition["spec"] = dict(spec)
    definition.update(task or {})
    hosted: Worker | type[Worker] = worker if isinstance(worker, Worker) else cls
    if config is not None:
        hosted = cls(dict(config))  # the worker's config, as a manifest's ``config`` gives it
    async with Orchestrator(workers=[hosted], llm=llm) as orch:
        return await orch.run({"goal": f"test {cls.capability}", "tasks": [definition]})


class WorkerHarness(Protocol):
    """``await worker_harness(WorkerClass, input, spec=..., config=...)`` -> ``RunResult``."""

    async def __call__(self, worker: type[Worker] | Worker | str, input: Any = None, **kwargs: Any) -> RunResult:
        """Run one task; keyword arguments as for :func:`run_worker`."""


@pytest.fixture
async def worker_harness(sim_llm: SimulatedVLLM) -> WorkerHarness:
    """``run_worker`` with ``llm`` pointing at the ``sim_llm`` simulator."""
    settings = InferenceSettings(url=sim_llm.url, model=sim_llm.model, timeout=10.0, backoff_initial=0.01,
                                 backoff_max=0.1)

    async def harness(worker: type[Worker] | Worker | str, input: Any = None, **kwargs: Any) -> RunResult:
        kwargs.setdefault("llm", settings)
        return await run_worker(worker, input, **kwargs)

    return harness


@pytest.fixture(scope="session")
def real_llm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    """``llama-server`` serving SmolLM2-135M-Instruct on a free port, for the whole session.

    Skips with the reason when the cache of ``scripts/real-model`` is absent. ``ORCH_REAL_MODEL_THREADS``
    sets its CPU threads (default 2). Its log is in the session's temporary directory.
    """
    try:
        real = RealModel.find()
    except RealModelUnavailable as exc:
        pytest.skip(str(exc))
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    threads = int(os.environ.get("ORCH_REAL_MODEL_THREADS", "2"))
    with LlamaServer(real, threads=threads, log_path=log) as server:
        yield server
