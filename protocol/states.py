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

__all__ = (
    "OVERRIDE_RULES",
    "TERMINAL",
    "TRANSITIONS",
    "VERIFY_CHAIN",
    "RunState",
    "TaskEvent",
    "TaskState",
    "VerifyStage",
    "override_allowed",
    "transition",
)


class TaskState(StrEnum):
    """Where a task stands."""

    NOT_DONE = "not_done"
    DONE = "done"
    VERIFY_DONE = "verify_done"
    REDO = "redo"
    ACCEPTED = "accepted"
    FAILED = "failed"
    CANCELLED = "cancelled"


class RunState(StrEnum):
    """Where a run stands."""

    RUNNING = "running"
    ACCEPTED = "accepted"
    FAILED = "failed"
    CANCELLED = "cancelled"


class VerifyStage(StrEnum):
    """Which verifier a ``verify_done`` task is with."""

    SPEC = "spec"      # expect, schema and check: the cheap, deterministic ones
    WORKER = "worker"  # the worker's own ``verify`` (when it said it has one)
    JUDGE = "judge"    # an LLM judge against the spec's description
    HUMAN = "human"    # a person approves or rejects


# The order verification runs in; a stage that does not apply to a task is skipped, and a
# result is accepted once it passed the last stage that applies.
VERIFY_CHAIN: tuple[VerifyStage, ...] = (VerifyStage.SPEC, VerifyStage.WORKER, VerifyStage.JUDGE, VerifyStage.HUMAN)


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
    try:  # a member and its string value look up alike (StrEnum), so no conversion is needed
        return TRANSITIONS[state][event]
    except (KeyError, TypeError):
        raise IllegalTransition(str(state), str(event), task_id=task_id) from None


# Which override a person may give in which (state, verify stage); None matches any stage.
# The manager applies overrides by this table and the CLI explains refusals from it.
OVERRIDE_RULES: MappingProxyType[str, tuple[tuple[TaskState, VerifyStage | None], ...]] = MappingProxyType({
    "approve": ((S.VERIFY_DONE, VerifyStage.HUMAN),),
    "accept": ((S.DONE, None), (S.VERIFY_DONE, None)),
    "reject": ((S.DONE, None), (S.VERIFY_DONE, None)),
    "redo": ((S.NOT_DONE, None), (S.DONE, None), (S.VERIFY_DONE, None), (S.REDO, None)),
    "cancel": ((S.NOT_DONE, None), (S.DONE, None), (S.VERIFY_DONE, None), (S.REDO, None)),
})


def override_allowed(action: str, state: TaskState, stage: VerifyStage | None) -> bool:
    """Whether a person's ``action`` applies to a task in ``state`` (at verify ``stage``)."""
    return any(state == s and (want is None or want == stage) for s, want in OVERRIDE_RULES.get(action, ()))
