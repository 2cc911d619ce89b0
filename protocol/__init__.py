"""The contract manager and workers share: messages, codec, state machine, bus."""

from protocol.bus import Bus, BusSettings, DeadLetter, Delivery, MemoryBus
from protocol.codec import Codec
from protocol.envelope import PROTOCOL_VERSION, Envelope
from protocol.messages import (
    Assign,
    Cancel,
    Done,
    Failed,
    Heartbeat,
    Override,
    Progress,
    Redo,
    RunEvent,
    RunEvents,
    Submit,
    Verdict,
    VerifyRequest,
    VerifyResponse,
)
from protocol.states import TaskEvent, TaskState, transition

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
    "MemoryBus",
    "Override",
    "Progress",
    "Redo",
    "RunEvent",
    "RunEvents",
    "Submit",
    "TaskEvent",
    "TaskState",
    "Verdict",
    "VerifyRequest",
    "VerifyResponse",
    "transition",
)
