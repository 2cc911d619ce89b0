"""``SimulatedVLLM``: the simulator as an async context manager, on a free local port."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterable
from contextlib import asynccontextmanager
from typing import Self

import anyio
import structlog

from ._http import HttpLimits, HttpServer
from .app import SimApp
from .config import FaultRates, SimConfig
from .engine import Engine
from .faults import Fault
from .policy import DefaultPolicy, Policy
from .stats import SimStats

__all__ = ("SimulatedVLLM",)

log = structlog.get_logger(__name__)


class SimulatedVLLM(anyio.AsyncContextManagerMixin):
    """A simulated vLLM server. ``async with SimulatedVLLM(config) as sim: sim.url``.

    Its answers are scripted by ``policy`` and marked as simulated (``x-simulated: true`` header,
    ``system_fingerprint="orchestrator-simulator"``).
    """

    def __init__(self, config: SimConfig | None = None, *, policy: Policy | None = None) -> None:
        self.config = config or SimConfig()
        self.stats = SimStats()
        self.engine = Engine(self.config, self.stats)
        self.app = SimApp(self.config, self.engine, self.stats, policy or DefaultPolicy())
        c = self.config
        self._server = HttpServer(self.app, c.host, c.port, HttpLimits(
            idle_timeout_s=c.idle_timeout_s, request_timeout_s=c.request_timeout_s, send_timeout_s=c.send_timeout_s,
            max_body_bytes=c.max_body_bytes))
        self.port = 0

    @property
    def url(self) -> str:
        """Base URL, without ``/v1``."""
        return f"http://{self.config.host}:{self.port}"

    @property
    def model(self) -> str:
        """The canonical served model name."""
        return self.config.model

    @asynccontextmanager
    async def __asynccontextmanager__(self) -> AsyncGenerator[Self]:
        async with anyio.create_task_group() as tg:
            await tg.start(self.engine.run)
            self.port = await tg.start(self._server.serve)
            log.info("sim_started", url=self.url, model=self.model, max_num_seqs=self.config.max_num_seqs,
                     time_scale=self.config.time_scale)
            try:
                yield self
            finally:
                tg.cancel_scope.cancel()
                log.info("sim_stopped", url=self.url)

    async def serve_forever(self) -> None:
        """Serve until cancelled (the console entry point)."""
        async with self:
            await anyio.sleep_forever()

    # -- fault control ----------------------------------------------------------------------------

    def script_faults(self, faults: Iterable[Fault | None]) -> None:
        """Inject these faults into the next generation requests, in order (``None`` = no fault)."""
        self.app.faults.script(faults)

    def set_fault_rates(self, **rates: float) -> None:
        """Inject faults at random with these probabilities, e.g. ``server_error=0.2, hang=0.05``."""
        self.app.faults.set_rates(FaultRates(**rates))

    def clear_faults(self) -> None:
        """Stop injecting faults."""
        self.app.faults.clear()

    def kill_engine(self) -> None:
        """Engine death: /health answers 503 and every generation request 500."""
        self.engine.kill()

    def revive_engine(self) -> None:
        """Undo ``kill_engine``."""
        self.engine.revive()
