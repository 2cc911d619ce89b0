"""Role markers the agents put in their system prompts, so the simulator knows which part to play.

The planner, worker and judge agents import these constants; the simulator's default policy
looks for them. A marker is one line of the system prompt, e.g. ``[role: planner]``. They live in
``protocol/`` because workers may import only the contract.
"""

from __future__ import annotations

from typing import Final, Literal

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

Role = Literal["planner", "worker", "judge"]


def role_marker(role: Role) -> str:
    """Return the system-prompt line that names ``role``."""
    return f"[role: {role}]"


ROLE_PLANNER: Final = role_marker("planner")
ROLE_WORKER: Final = role_marker("worker")
ROLE_JUDGE: Final = role_marker("judge")

# Headings inside user messages; the policy reads the text that follows them.
GOAL_HEADING: Final = "Goal:"
INSTRUCTION_HEADING: Final = "Instruction:"
ANSWER_HEADING: Final = "Answer to verify:"
FEEDBACK_HEADING: Final = "Verifier feedback:"

_ROLES: Final[tuple[Role, ...]] = ("planner", "worker", "judge")


def detect_role(system_prompt: str) -> Role | None:
    """Return the role whose marker appears in ``system_prompt``, or None."""
    for role in _ROLES:
        if role_marker(role) in system_prompt:
            return role
    return None
