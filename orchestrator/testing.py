"""Pytest fixtures for code that calls the LLM: a running simulator and a client pointed at it.

Use as a plugin (``pytest_plugins = ["orchestrator.testing"]`` in the root conftest) or import
the fixtures into a conftest. Override ``sim_config`` / ``inference_settings`` to tune them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import TypeVar

import pytest

from orchestrator.simulator import SimConfig, SimulatedVLLM
from protocol.inference import InferenceClient, InferenceSettings

__all__ = ("held_in_task", "inference_client", "inference_settings", "sim_config", "sim_llm")

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
