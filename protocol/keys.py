"""Every stream and topic name, in one place.

Names are logical; a bus maps them to its own keys (the Redis bus adds hash tags so that a
capability's task and result streams share a Cluster slot and can be committed atomically).
"""

from __future__ import annotations

__all__ = ("CONTROL_TOPIC", "DEAD_LETTER_SUFFIX", "MANAGER_GROUP", "results_stream", "tasks_stream", "workers_group")

CONTROL_TOPIC = "control"
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
