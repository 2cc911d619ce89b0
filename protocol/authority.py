"""Which role may send which message, and on which stream: the table the codec enforces.

The signature says who sent a message; this table says whether that sender may. A worker key
can sign only replies, and only on its own capability's result stream; only the manager assigns,
asks for verification, cancels and writes history; only an operator submits jobs or overrides.
"""

from __future__ import annotations

from protocol.errors import BadSignature
from protocol.keys import CONTROL_TOPIC, JOBS_STREAM, OVERRIDES_STREAM

__all__ = ("SENDER_ROLE", "check_sender", "signer_for", "sole_reader")

# Message type -> the role whose key must sign it.
SENDER_ROLE: dict[str, str] = {
    "assign": "manager",
    "verify_request": "manager",
    "cancel": "manager",
    "run_events": "manager",
    "redo": "manager",
    "done": "worker",
    "failed": "worker",
    "heartbeat": "worker",
    "progress": "worker",
    "verify_response": "worker",
    "submit": "operator",
    "override": "operator",
}


def sole_reader(kind: str) -> str | None:
    """The one identity that reads ``kind`` messages, when only one does: a worker's replies are the manager's.

    Such a message may carry a MAC for that reader instead of a signature (see protocol.keyring).
    """
    return "manager" if SENDER_ROLE.get(kind) == "worker" else None


def signer_for(stream: str) -> str | None:
    """The identity that signs what is published on ``stream``; None means "this process's operator"."""
    if stream.startswith("results."):
        return f"worker:{stream.removeprefix('results.')}"
    if stream in (JOBS_STREAM, OVERRIDES_STREAM):
        return None
    if stream.startswith(("tasks.", "events.")) or stream == CONTROL_TOPIC:
        return "manager"
    return None


def check_sender(kind: str, signer: str, stream: str | None = None) -> None:
    """BadSignature unless ``signer`` may send a ``kind`` message (on ``stream``, when known)."""
    role = signer.partition(":")[0]
    wanted = SENDER_ROLE.get(kind)
    if wanted is None or role != wanted:
        raise BadSignature(f"a {kind!r} message must be signed by a key of role {wanted or 'unknown'!r}, "
                           f"not by {signer!r}")
    if stream is not None:
        owner = signer_for(stream)
        if owner is not None and owner != signer:
            raise BadSignature(f"{signer!r} may not publish on {stream!r} (only {owner!r} may)")
