"""The contract manager and workers share: messages, codec, state machine, bus."""

from protocol.bus import Bus, BusSettings, DeadLetter, Delivery, MemoryBus
from protocol.codec import Codec
from protocol.envelope import PROTOCOL_VERSION, Envelope
from protocol.history import HistoryEvent
from protocol.messages import (
    Assign,
    Cancel,
    Done,
    Failed,
    Heartbeat,
    Override,
    Progress,
    Redo,
    RunEvents,
    Submit,
    Verdict,
    VerifyRequest,
    VerifyResponse,
)
from protocol.states import RunState, TaskEvent, TaskState, VerifyStage, transition

__all__ = (
    "PROTOCOL_VERSION",
    "Assign",
    "Bus",
    "BusSettings",
    "Cancel",
    "Codec",
    "DeadLetter",
    "Delivery",
    "Done",
    "Envelope",
    "Failed",
    "Heartbeat",
    "HistoryEvent",
    "MemoryBus",
    "Override",
    "Progress",
    "Redo",
    "RunEvents",
    "RunState",
    "Submit",
    "TaskEvent",
    "TaskState",
    "Verdict",
    "VerifyRequest",
    "VerifyResponse",
    "VerifyStage",
    "transition",
)
