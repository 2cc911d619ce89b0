"""Envelope <-> msgpack bytes, with strict checks on the way in.

Decoding never raises anything but :class:`~protocol.errors.ProtocolError`: a frame is
checked for size, then unpacked, then its version and body type are checked (so the error
says which one is wrong), then the whole envelope is validated (unknown fields rejected).
Optionally envelopes carry an HMAC-SHA256 over their encoding without the ``sig`` field,
so a worker holding only its own key cannot pose as the manager.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any, get_args

import msgpack
from pydantic import ValidationError

from protocol.envelope import PROTOCOL_VERSION, Envelope
from protocol.errors import BadSignature, DecodeError, FrameTooLarge, UnknownMessageType, UnsupportedVersion
from protocol.limits import check_shape
from protocol.messages import MessageType

__all__ = ("DEFAULT_MAX_FRAME_BYTES", "Codec")

DEFAULT_MAX_FRAME_BYTES = 1024 * 1024
_KNOWN_TYPES = frozenset(get_args(MessageType))


@dataclass(frozen=True, slots=True)
class Codec:
    """Encodes and decodes envelopes; one instance per process is enough."""

    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    hmac_key: bytes | None = None

    def encode(self, envelope: Envelope) -> bytes:
        """Pack an envelope (signing it when a key is set); raises DecodeError for unencodable values."""
        data = envelope.model_dump(exclude={"sig"})
        try:
            if self.hmac_key is not None:
                data["sig"] = self._sign(msgpack.packb(data, use_bin_type=True))
            frame: bytes = msgpack.packb(data, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise DecodeError(f"cannot encode {envelope.type!r} message: {exc}") from exc
        if len(frame) > self.max_frame_bytes:
            raise FrameTooLarge(f"{envelope.type!r} message is {len(frame)} bytes, over the limit of "
                                f"{self.max_frame_bytes}")
        return frame

    def decode(self, frame: bytes) -> Envelope:
        """Unpack and validate a frame, or raise a ProtocolError that says what is wrong."""
        if not isinstance(frame, bytes | bytearray | memoryview):
            raise DecodeError(f"frame must be bytes, got {type(frame).__name__}")
        if len(frame) > self.max_frame_bytes:
            raise FrameTooLarge(f"frame is {len(frame)} bytes, over the limit of {self.max_frame_bytes}")
        try:
            data = msgpack.unpackb(frame, raw=False, strict_map_key=True)
        except Exception as exc:  # msgpack raises a dozen unrelated types on garbage; all mean the same here
            raise DecodeError(f"frame is not valid msgpack: {type(exc).__name__}: {exc}") from exc
        if not isinstance(data, dict):
            raise DecodeError(f"frame must hold a map, got {type(data).__name__}")
        check_shape(data)  # before anything walks it: too deep or too many values is a LimitExceeded
        self._check_header(data)
        if self.hmac_key is not None:
            self._check_signature(data)
        try:
            return Envelope.model_validate(data)
        except ValidationError as exc:
            raise DecodeError(f"invalid {data['body'].get('type')!r} message: {_first_errors(exc)}") from exc

    @staticmethod
    def _check_header(data: dict[Any, Any]) -> None:
        version = data.get("v")
        if version != PROTOCOL_VERSION:
            raise UnsupportedVersion(f"protocol version {version!r} is not supported (this side speaks "
                                     f"{PROTOCOL_VERSION})")
        body = data.get("body")
        if not isinstance(body, dict):
            raise DecodeError("envelope has no body map")
        kind = body.get("type")
        if not isinstance(kind, str) or kind not in _KNOWN_TYPES:
            raise UnknownMessageType(f"unknown message type {kind!r}")

    def _check_signature(self, data: dict[str, Any]) -> None:
        sig = data.pop("sig", None)
        if not isinstance(sig, bytes):
            raise BadSignature("message is not signed")
        if not hmac.compare_digest(sig, self._sign(msgpack.packb(data, use_bin_type=True))):
            raise BadSignature("message signature does not match")

    def _sign(self, payload: bytes) -> bytes:
        assert self.hmac_key is not None
        return hmac.new(self.hmac_key, payload, hashlib.sha256).digest()


def _first_errors(exc: ValidationError, limit: int = 3) -> str:
    parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:limit]]
    more = exc.error_count() - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
