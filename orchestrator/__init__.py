"""orchestrator: a manager that turns a goal into verified work by worker agents.

The errors a user of the API or the CLI meets are importable from here (``from orchestrator
import JobError``); the whole tree is in :mod:`protocol.errors`. Every one is an
``OrchestratorError``; ``ConfigError`` and its subclasses are bad input (the CLI's exit 2).
"""

from orchestrator.api import Orchestrator, Run, RunResult
from orchestrator.job import Budget, Job, Spec, TaskDef, load_job, parse_job
from orchestrator.manager import Manager, ManagerSettings
from orchestrator.planner import PlanError
from orchestrator.records import Event, RunRecord, RunState, TaskRecord
from orchestrator.store import MemoryStore, Store
from protocol.errors import (
    BusUnavailable,
    ConfigError,
    InferenceError,
    JobError,
    ManifestError,
    NoActiveManager,
    OrchestratorError,
    PluginLoadError,
    ServiceUnreachable,
    UnknownRun,
)

__all__ = (
    "Budget",
    "BusUnavailable",
    "ConfigError",
    "Event",
    "InferenceError",
    "Job",
    "JobError",
    "Manager",
    "ManagerSettings",
    "ManifestError",
    "MemoryStore",
    "NoActiveManager",
    "Orchestrator",
    "OrchestratorError",
    "PlanError",
    "PluginLoadError",
    "Run",
    "RunRecord",
    "RunResult",
    "RunState",
    "ServiceUnreachable",
    "Spec",
    "Store",
    "TaskDef",
    "TaskRecord",
    "UnknownRun",
    "load_job",
    "parse_job",
)
