"""Role markers, re-exported from ``protocol.roles`` (workers import them from there)."""

from __future__ import annotations

from protocol.roles import (
    ANSWER_HEADING,
    FEEDBACK_HEADING,
    GOAL_HEADING,
    INSTRUCTION_HEADING,
    ROLE_JUDGE,
    ROLE_PLANNER,
    ROLE_WORKER,
    Role,
    detect_role,
    role_marker,
)

__all__ = (
    "ANSWER_HEADING",
    "FEEDBACK_HEADING",
    "GOAL_HEADING",
    "INSTRUCTION_HEADING",
    "ROLE_JUDGE",
    "ROLE_PLANNER",
    "ROLE_WORKER",
    "Role",
    "detect_role",
    "role_marker",
)
