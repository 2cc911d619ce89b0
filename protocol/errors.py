"""The one exception family every layer raises.

```
OrchestratorError
├ ConfigError          misuse or bad settings, found at startup
│ ├ JobError           an invalid job file or object (names file, task id, field)
│ ├ UnknownRun         a run id no manager has reported and no submission waits for
│ └ ManifestError      an invalid fleet manifest (names file, field path, reason)
│   └ ServiceUnreachable  the manifest's Redis or LLM does not answer
├ NoActiveManager      nothing holds the manager lease
├ ProtocolError        a frame that cannot be trusted
│ ├ DecodeError        truncated, random or mistyped bytes
│ ├ FrameTooLarge      over the configured size limit
│ ├ UnsupportedVersion an envelope from another protocol version
│ ├ UnknownMessageType a body type this version does not know
│ └ BadSignature       unsigned, wrongly signed, or signed by a role that may not send it
├ BusError             the transport
│ ├ BusUnavailable     cannot reach the broker after retries
│ └ LeaseLost          a commit from a consumer that no longer owns the entry
├ TaskError            one task, carries task_id
│ ├ IllegalTransition  an event the state machine does not allow
│ └ BudgetExhausted    attempts, tasks, tokens or time spent
├ WorkerError          the worker side
│ ├ PluginLoadError    a plugin that cannot be imported or is no Worker
│ └ NoCapableWorker    no worker serves a capability
└ InferenceError       the language-model server
  ├ InferenceUnavailable  unreachable, or does not serve the model
  ├ InferenceTimeout      no answer in time, after retries
  ├ ContextLengthExceeded the prompt does not fit the model's context
  └ BadCompletion         an answer that cannot be used (empty, invalid JSON)
```

A failure crosses the bus as a ``failed`` message carrying text, never as a pickled
exception.
"""

from __future__ import annotations

__all__ = (
    "BadCompletion",
    "BadSignature",
    "BudgetExhausted",
    "BusError",
    "BusUnavailable",
    "ConfigError",
    "ContextLengthExceeded",
    "DecodeError",
    "FrameTooLarge",
    "IllegalTransition",
    "InferenceError",
    "InferenceTimeout",
    "InferenceUnavailable",
    "JobError",
    "LeaseLost",
    "ManifestError",
    "NoActiveManager",
    "NoCapableWorker",
    "OrchestratorError",
    "PluginLoadError",
    "ProtocolError",
    "ServiceUnreachable",
    "TaskError",
    "UnknownMessageType",
    "UnknownRun",
    "UnsupportedVersion",
    "WorkerError",
)


class OrchestratorError(Exception):
    """Root of every error this project raises on purpose."""


class ConfigError(OrchestratorError):
    """Misuse or bad settings, detected before anything runs."""


class JobError(ConfigError):
    """An invalid job; the message names the file, the task id and the field."""

    def __init__(self, message: str, *, source: str | None = None, task_id: str | None = None,
                 field: str | None = None) -> None:
        parts = [p for p in (source, f"task {task_id!r}" if task_id else None,
                             f"field {field!r}" if field else None) if p]
        prefix = ": ".join(parts)
        super().__init__(f"{prefix}: {message}" if prefix else message)
        self.reason = message
        self.source = source
        self.task_id = task_id
        self.field = field


class ManifestError(ConfigError):
    """An invalid fleet manifest; the message names the file, the field path and the reason."""

    def __init__(self, reason: str, *, source: str | None = None, field: str | None = None) -> None:
        prefix = ": ".join(p for p in (source, field) if p)
        super().__init__(f"{prefix}: {reason}" if prefix else reason)
        self.reason = reason
        self.source = source
        self.field = field


class ServiceUnreachable(ManifestError):
    """A service the manifest names (Redis, the LLM server) did not answer the startup check."""


class ProtocolError(OrchestratorError):
    """A frame that cannot be decoded or trusted."""


class DecodeError(ProtocolError):
    """Bytes that are not a valid envelope."""


class FrameTooLarge(ProtocolError):
    """A frame over the configured size limit."""


class ValueTooLarge(ProtocolError):
    """A stored value over the size its reader allows (``Bus.get_value(max_bytes=...)``)."""


class UnsupportedVersion(ProtocolError):
    """An envelope written by a protocol version this code does not speak."""


class UnknownMessageType(ProtocolError):
    """A body whose ``type`` this protocol version does not define."""


class BadSignature(ProtocolError):
    """An HMAC signature that is missing or does not match."""


class UnknownRun(ConfigError):
    """No manager has reported this run and no submission of it is waiting: a mistyped or expired id."""


class NoActiveManager(OrchestratorError):
    """Nothing holds the manager lease, so nothing will start or move a submitted run."""


class SubmissionRefused(OrchestratorError):
    """A manager took a submission and dead-lettered it (or it vanished) instead of starting its run."""


class BusError(OrchestratorError):
    """The message transport failed."""


class BusUnavailable(BusError):
    """The broker could not be reached within the retry budget."""


class LeaseLost(BusError):
    """A consumer tried to commit an entry it no longer owns (it was reclaimed)."""


class TaskError(OrchestratorError):
    """An error about one task."""

    def __init__(self, message: str, *, task_id: str | None = None) -> None:
        super().__init__(f"task {task_id!r}: {message}" if task_id else message)
        self.task_id = task_id


class IllegalTransition(TaskError):
    """The state machine does not allow this event in this state."""

    def __init__(self, state: str, event: str, *, task_id: str | None = None) -> None:
        super().__init__(f"event {event!r} is not allowed in state {state!r}", task_id=task_id)
        self.state = state
        self.event = event


class BudgetExhausted(TaskError):
    """Attempts, tasks, tokens or wall-clock time ran out."""


class WorkerError(OrchestratorError):
    """An error on the worker side."""


class PluginLoadError(WorkerError):
    """A worker plugin could not be loaded; the message names the plugin."""


class NoCapableWorker(WorkerError):
    """No loaded worker serves the requested capability."""


class InferenceError(OrchestratorError):
    """The language-model server failed or answered unusably."""


class InferenceUnavailable(InferenceError):
    """The server is unreachable or does not serve the configured model."""


class InferenceTimeout(InferenceError):
    """No answer within the timeout, after retries."""


class ContextLengthExceeded(InferenceError):
    """The prompt plus max_tokens exceed the model's context window (HTTP 400)."""


class BadCompletion(InferenceError):
    """An answer that cannot be used: empty, truncated or not the requested JSON.

    ``finish_reason`` says why the model stopped (``"length"``: cut off by max_tokens), ``tokens``
    what the answer cost, and ``text`` the answer as received, when there was one.
    """

    def __init__(self, message: str, *, finish_reason: str | None = None, tokens: int = 0, text: str = "") -> None:
        super().__init__(message)
        self.finish_reason = finish_reason
        self.tokens = tokens
        self.text = text
