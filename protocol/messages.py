"""Typed bodies of every message on the bus: a discriminated union on ``type``.

Bodies are frozen so a received message can be shared between coroutines without copies.
Outputs and inputs are JSON-like values (``Any``); they cross the wire as msgpack.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.history import HistoryEvent

__all__ = (
    "Assign",
    "Body",
    "Cancel",
    "Done",
    "Failed",
    "Heartbeat",
    "MessageType",
    "Override",
    "OverrideAction",
    "Progress",
    "Redo",
    "RunEvents",
    "StagedJob",
    "Submit",
    "Verdict",
    "VerifyRequest",
    "VerifyResponse",
)


class _Body(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Verdict(_Body):
    """The outcome of one verification: pass or fail, why, and what to change."""

    passed: bool
    feedback: str = ""
    corrections: tuple[str, ...] = ()
    verifier: str = ""
    tokens: int = 0  # what the verification itself cost (an LLM judge's tokens)


class Redo(_Body):
    """What a worker needs to try again: the plan, the context, the feedback and corrections."""

    type: Literal["redo"] = "redo"
    plan: str = ""
    context: str = ""
    feedback: str = ""
    corrections: tuple[str, ...] = ()


class Assign(_Body):
    """Manager -> worker: do this task (attempt k)."""

    type: Literal["assign"] = "assign"
    capability: str
    instruction: str
    input: Any = None
    config: dict[str, Any] = Field(default_factory=dict)
    spec_description: str = ""
    timeout_s: float | None = None
    # Every earlier failed verification, oldest first; empty on attempt 1.
    redo: tuple[Redo, ...] = ()
    # Outputs of the tasks this one depends on, by task id.
    dependencies: dict[str, Any] = Field(default_factory=dict)


class Done(_Body):
    """Worker -> manager: the worker says it finished; not yet trusted."""

    type: Literal["done"] = "done"
    output: Any = None
    tokens: int = 0
    duration_s: float = 0.0
    # The worker can check its own results: the manager should send it a verify request.
    self_check: bool = False


class Failed(_Body):
    """Worker -> manager: the attempt failed; the error travels as text, never pickled."""

    type: Literal["failed"] = "failed"
    error: str
    error_type: str = ""
    retryable: bool = True


class VerifyRequest(_Body):
    """Manager -> worker: check this output with the worker's own ``verify``."""

    type: Literal["verify_request"] = "verify_request"
    capability: str
    instruction: str
    input: Any = None
    output: Any = None
    spec_description: str = ""
    config: dict[str, Any] = Field(default_factory=dict)  # the task's config, as on its assign
    timeout_s: float | None = None  # the task's time limit, as on its assign


class VerifyResponse(_Body):
    """Worker -> manager: the verdict of a ``verify_request``."""

    type: Literal["verify_response"] = "verify_response"
    verdict: Verdict


class Cancel(_Body):
    """Anyone -> workers: stop this task (or the whole run when task_id is empty)."""

    type: Literal["cancel"] = "cancel"
    reason: str = ""
    by: str = ""


class Heartbeat(_Body):
    """Worker -> manager: still alive, still working on the task."""

    type: Literal["heartbeat"] = "heartbeat"
    in_flight: int = 0


class StagedJob(_Body):
    """Where a job too big for one message waits: the bus's value ``staged_job_key(run_id)``, ``size`` bytes of
    msgpack whose BLAKE2b-256 is ``digest``. The signed submission carries the digest, so the unsigned value
    cannot be changed unseen."""

    size: int = Field(ge=1)
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    tasks: int = Field(ge=0)  # how many, for ``status`` of a run no manager has taken yet


class Submit(_Body):
    """Client -> manager: start a run of this job under the envelope's run id.

    A job too big for one message is ``staged``: ``job`` then holds only its goal.
    """

    type: Literal["submit"] = "submit"
    job: dict[str, Any]
    source: str = ""
    staged: StagedJob | None = None


OverrideAction = Literal["approve", "reject", "redo", "accept", "cancel"]


class Override(_Body):
    """A person -> manager: approve, reject (with feedback), force a redo, accept, or cancel a task or run."""

    type: Literal["override"] = "override"
    action: OverrideAction
    feedback: str = ""
    by: str = ""


class RunEvents(_Body):
    """Manager -> anyone following a run: the run's next entries of history, in order.

    Events travel in batches (one message per run per group commit), so following a run costs
    the bus a write per batch, not one per transition.
    """

    type: Literal["run_events"] = "run_events"
    events: tuple[HistoryEvent, ...]


class Progress(_Body):
    """Worker -> manager: a free-form progress note for displays."""

    type: Literal["progress"] = "progress"
    message: str = ""
    fraction: float | None = Field(default=None, ge=0.0, le=1.0)


Body = Annotated[
    Assign | Done | Failed | VerifyRequest | VerifyResponse | Redo | Cancel | Heartbeat | Progress | Submit
    | Override | RunEvents,
    Field(discriminator="type"),
]

MessageType = Literal[
    "assign", "done", "failed", "verify_request", "verify_response", "redo", "cancel", "heartbeat", "progress",
    "submit", "override", "run_events",
]
