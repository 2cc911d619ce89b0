"""orchestrator: a manager that turns a goal into verified work by worker agents."""

from orchestrator.api import Orchestrator, Run, RunResult
from orchestrator.job import Budget, Job, Spec, TaskDef, load_job, parse_job
from orchestrator.manager import Manager, ManagerSettings
from orchestrator.records import Event, RunRecord, RunState, TaskRecord
from orchestrator.store import MemoryStore, Store

__all__ = (
    "Budget",
    "Event",
    "Job",
    "Manager",
    "ManagerSettings",
    "MemoryStore",
    "Orchestrator",
    "Run",
    "RunRecord",
    "RunResult",
    "RunState",
    "Spec",
    "Store",
    "TaskDef",
    "TaskRecord",
    "load_job",
    "parse_job",
)
