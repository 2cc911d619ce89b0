"""Every stream and topic name, in one place.

Names are logical; a bus maps them to its own keys (the Redis bus adds hash tags so that a
capability's task and result streams share a Cluster slot and can be committed atomically).
"""

from __future__ import annotations

__all__ = ("CONTROL_TOPIC", "DEAD_LETTER_SUFFIX", "JOBS_STREAM", "MANAGER_GROUP", "OVERRIDES_STREAM", "events_stream", "results_stream", "run_snapshot_key", "staged_job_key", "tasks_stream", "workers_group")

CONTROL_TOPIC = "control"
JOBS_STREAM = "jobs"  # submissions from clients to the active manager
OVERRIDES_STREAM = "overrides"  # a person's approve / reject / redo / accept / cancel, to the active manager
MANAGER_GROUP = "manager"
DEAD_LETTER_SUFFIX = ".dead"


def tasks_stream(capability: str) -> str:
    """Where the manager sends assign and verify requests for a capability."""
    return f"tasks.{capability}"


def results_stream(capability: str) -> str:
    """Where a capability's workers send done, failed, verify responses, heartbeats and progress."""
    return f"results.{capability}"


def workers_group(capability: str) -> str:
    """The consumer group shared by every worker of a capability (competing consumers)."""
    return f"workers.{capability}"


def run_snapshot_key(run_id: str) -> str:
    """Where the manager keeps a run's latest summary, readable by ``status`` from any machine."""
    return f"run.{run_id}"


def staged_job_key(run_id: str) -> str:
    """Where ``orchestrator submit`` leaves a job too big for one message, until a manager takes it."""
    return f"job.{run_id}"


def events_stream(run_id: str) -> str:
    """A run's history as the manager records it, for ``events`` and ``watch`` on any machine."""
    return f"events.{run_id}"
