"""The task state machine: the transition table as data, and one pure function over it.

```
            done            verify           pass
 not_done ──────▶ done ──────▶ verify_done ──────▶ accepted
    ▲  │ retry                     │ reject
    │  └──┐                        ▼
    └─────┴──── redispatch ──── redo ── exhaust ──▶ failed
```

Any non-terminal state can also be ``cancel``-led (-> cancelled) or ``exhaust``-ed
(-> failed: attempts, tokens or time spent). Nothing else changes a task's state.
"""

from __future__ import annotations

from enum import StrEnum
from types import MappingProxyType

from protocol.errors import IllegalTransition

__all__ = ("TERMINAL", "TRANSITIONS", "TaskEvent", "TaskState", "transition")


class TaskState(StrEnum):
    """Where a task stands."""

    NOT_DONE = "not_done"
    DONE = "done"
    VERIFY_DONE = "verify_done"
    REDO = "redo"
    ACCEPTED = "accepted"
    FAILED = "failed"
    CANCELLED = "cancelled"


class TaskEvent(StrEnum):
    """What can happen to a task."""

    DONE = "done"              # the worker reports it finished
    RETRY = "retry"            # the worker reported failure; try again within budget
    VERIFY = "verify"          # the manager starts checking the result
    PASS = "pass"              # every check passed
    REJECT = "reject"          # a check failed; a redo order follows
    REDISPATCH = "redispatch"  # the redo order was sent: next attempt
    EXHAUST = "exhaust"        # a budget is spent, or the failure is unrecoverable
    CANCEL = "cancel"          # a person or a cancelled parent stopped it


S, E = TaskState, TaskEvent

TERMINAL = frozenset({S.ACCEPTED, S.FAILED, S.CANCELLED})

_ENDINGS = {E.EXHAUST: S.FAILED, E.CANCEL: S.CANCELLED}

TRANSITIONS: MappingProxyType[TaskState, MappingProxyType[TaskEvent, TaskState]] = MappingProxyType({
    S.NOT_DONE: MappingProxyType({E.DONE: S.DONE, E.RETRY: S.NOT_DONE, **_ENDINGS}),
    S.DONE: MappingProxyType({E.VERIFY: S.VERIFY_DONE, **_ENDINGS}),
    S.VERIFY_DONE: MappingProxyType({E.PASS: S.ACCEPTED, E.REJECT: S.REDO, **_ENDINGS}),
    S.REDO: MappingProxyType({E.REDISPATCH: S.NOT_DONE, **_ENDINGS}),
    S.ACCEPTED: MappingProxyType({}),
    S.FAILED: MappingProxyType({}),
    S.CANCELLED: MappingProxyType({}),
})


def transition(state: TaskState, event: TaskEvent, *, task_id: str | None = None) -> TaskState:
    """Return the state ``event`` leads to from ``state``, or raise IllegalTransition."""
    try:
        return TRANSITIONS[TaskState(state)][TaskEvent(event)]
    except (KeyError, ValueError):
        raise IllegalTransition(str(state), str(event), task_id=task_id) from None
