"""A faithful vLLM simulator: the same HTTP API, error shapes and a continuous-batching latency model.

``async with SimulatedVLLM(SimConfig(time_scale=0.01)) as sim: ...`` serves on ``sim.url``.
Its answers are scripted (``Policy``) and say they are simulated.
"""

from __future__ import annotations

from protocol.roles import ROLE_JUDGE, ROLE_PLANNER, ROLE_WORKER, Role, detect_role, role_marker

from .cli import serve
from .config import FaultRates, LatencyModel, SimConfig
from .faults import Fault, FaultInjector
from .policy import Answer, DefaultPolicy, Policy, RulesPolicy, SimRequest
from .server import SimulatedVLLM
from .stats import SimStats
from .tokenizer import Tokenizer

__all__ = (
    "ROLE_JUDGE",
    "ROLE_PLANNER",
    "ROLE_WORKER",
    "Answer",
    "DefaultPolicy",
    "Fault",
    "FaultInjector",
    "FaultRates",
    "LatencyModel",
    "Policy",
    "Role",
    "RulesPolicy",
    "SimConfig",
    "SimRequest",
    "SimStats",
    "SimulatedVLLM",
    "Tokenizer",
    "detect_role",
    "role_marker",
    "serve",
)
