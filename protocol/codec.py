"""Envelope <-> msgpack bytes, with strict checks on the way in.

Decoding never raises anything but :class:`~protocol.errors.ProtocolError`: a frame is
checked for size, then unpacked, then its version and body type are checked (so the error
says which one is wrong), then the whole envelope is validated (unknown fields rejected).
A codec built with a :class:`~protocol.keyring.Keyring` signs every envelope it encodes (Ed25519
over the encoding without the ``sig`` field, with the signer's identity inside the signed part)
and, on the way in, rejects a frame unless a known key signed it and that key's role may send
that message on that stream (:mod:`protocol.authority`). A message with a sole reader (a
worker's reply, read only by the manager) carries a ``mac`` for that reader in place of ``sig``,
over the same bytes (``reply_macs=False`` signs those too). Messages encoded together
(``encode_many``) carry a ``bsig`` instead: one signature for the batch (:mod:`protocol.batch_proof`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast, get_args

import msgpack
from pydantic import ValidationError

from protocol import batch_proof
from protocol.authority import check_sender, sole_reader
from protocol.envelope import PROTOCOL_VERSION, Envelope
from protocol.errors import (
    BadSignature,
    DecodeError,
    FrameTooLarge,
    ProtocolError,
    UnknownMessageType,
    UnsupportedVersion,
)
from protocol.limits import check_shape
from protocol.messages import MessageType

if TYPE_CHECKING:
    from protocol.keyring import Keyring

__all__ = ("DEFAULT_MAX_FRAME_BYTES", "Codec")

DEFAULT_MAX_FRAME_BYTES = 1024 * 1024
_KNOWN_TYPES = frozenset(get_args(MessageType))


@dataclass(frozen=True, slots=True)
class Codec:
    """Encodes and decodes envelopes; one instance per process is enough.

    ``keyring`` turns signing on: ``signers`` are the identities this process may sign as (the
    first is used where the stream does not decide, e.g. an operator's submissions).
    ``reply_macs``: a message with a sole reader gets a MAC for it rather than a signature (both
    are always accepted on the way in); off, every message is signed, which a third party can check.
    """

    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    keyring: Keyring | None = None
    signers: tuple[str, ...] = ()
    reply_macs: bool = True

    def __post_init__(self) -> None:
        if self.keyring is not None:
            for ident in self.signers:
                self.keyring.signing_key(ident)  # fail now, naming the missing key, not on first publish

    @property
    def verifies(self) -> bool:
        """Whether decoded envelopes' ``signer`` fields are proven (signing on)."""
        return self.keyring is not None

    def encode(self, envelope: Envelope, *, signer: str | None = None) -> bytes:
        """Pack an envelope, signed as ``signer`` (default: this process's first identity) when signing is on."""
        if self.keyring is None:
            return self._framed(envelope, envelope.model_dump(exclude={"sig"}))
        data, payload, ident, reader = self._unsigned(envelope, signer)
        if reader is not None:
            return self._framed(envelope, data, payload, "mac", self.keyring.mac(ident, reader, payload))
        return self._framed(envelope, data, payload, "sig", self.keyring.sign(ident, payload))

    def encode_many(self, items: Sequence[tuple[Envelope, str | None]]) -> list[bytes]:
        """``encode`` for each (envelope, signer); the envelopes one identity signs get one signature between them.

        Messages sent together (the assigns of the runs a manager starts at once, the history a commit
        mirrors) carry a ``bsig``: one Ed25519 signature over a Merkle tree of the batch, with the message's
        audit path (:mod:`protocol.batch_proof`). A reader checks each one alone, and checks a signature it
        has already checked once (its other messages of the batch) by a lookup. Raises as ``encode`` does.
        """
        frames = self.encode_each(items)
        error = next((frame for frame in frames if isinstance(frame, ProtocolError)), None)
        if error is None:
            return cast(list[bytes], frames)
        # Raised with nothing in this frame (which its traceback holds) leading back to it or to the batch:
        # a cycle through them kept every frame of the batch until a full collection.
        del frames, items
        try:
            raise error
        finally:
            del error

    def encode_each(self, items: Sequence[tuple[Envelope, str | None]]) -> list[bytes | ProtocolError]:
        """``encode_many``, with the error of an envelope that cannot be encoded in its place: the others are sent."""
        if self.keyring is None or len(items) < 2:
            return [self._encoded_or_error(envelope, signer) for envelope, signer in items]
        frames: list[bytes | ProtocolError] = [b""] * len(items)
        batches: dict[str, list[tuple[int, Envelope, dict[str, Any], bytes]]] = {}
        for i, (envelope, signer) in enumerate(items):
            try:
                data, payload, ident, reader = self._unsigned(envelope, signer)
                if reader is not None:
                    frames[i] = self._framed(envelope, data, payload, "mac", self.keyring.mac(ident, reader, payload))
                else:
                    batches.setdefault(ident, []).append((i, envelope, data, payload))
            except ProtocolError as exc:
                frames[i] = exc
        for ident, unsigned in batches.items():
            for start in range(0, len(unsigned), batch_proof.MAX_BATCH):
                chunk = unsigned[start:start + batch_proof.MAX_BATCH]
                if len(chunk) == 1:
                    i, envelope, data, payload = chunk[0]
                    frames[i] = self._framed_or_error(envelope, data, payload, "sig", self.keyring.sign(ident, payload))
                    continue
                root, paths = batch_proof.tree([batch_proof.leaf_hash(payload) for *_, payload in chunk])
                signature = self.keyring.sign(ident, batch_proof.signed_root(len(chunk), root))
                for index, ((i, envelope, data, payload), path) in enumerate(zip(chunk, paths, strict=True)):
                    frames[i] = self._framed_or_error(envelope, data, payload, "bsig",
                                                      [signature, index, len(chunk), path])
        return frames

    def _encoded_or_error(self, envelope: Envelope, signer: str | None) -> bytes | ProtocolError:
        try:
            return self.encode(envelope, signer=signer)
        except ProtocolError as exc:
            return _bare(exc)

    def _framed_or_error(self, envelope: Envelope, data: dict[str, Any], payload: bytes, proof: str,
                         tag: Any) -> bytes | ProtocolError:
        try:  # too big once its proof is on: its batch's other messages are still good
            return self._framed(envelope, data, payload, proof, tag)
        except ProtocolError as exc:
            return _bare(exc)

    def _unsigned(self, envelope: Envelope, signer: str | None) -> tuple[dict[str, Any], bytes, str, str | None]:
        """The envelope's map with its signer, the bytes its proof covers, the signer, and the reader a MAC is for."""
        assert self.keyring is not None
        ident = signer or envelope.signer or (self.signers[0] if self.signers else "")
        if ident not in self.signers:
            raise BadSignature(f"this process holds no key to sign as {ident or 'anyone'!r} "
                               f"(it signs as: {', '.join(self.signers) or 'nobody'})")
        data = envelope.model_dump(exclude={"sig"})
        data["signer"] = ident
        payload = self._packed(envelope, data)
        reader = sole_reader(envelope.type) if self.reply_macs else None
        return data, payload, ident, reader if reader is not None and reader in self.keyring.public else None

    def _framed(self, envelope: Envelope, data: dict[str, Any], payload: bytes | None = None, proof: str = "",
                tag: Any = None) -> bytes:
        """The frame: ``payload`` (or ``data`` packed) with ``proof: tag`` as its last entry; checked for size."""
        if proof:
            data[proof] = tag
            frame = _with_last_entry(payload, proof, tag) if payload else None
            frame = frame or self._packed(envelope, data)
        else:
            frame = self._packed(envelope, data)
        if len(frame) > self.max_frame_bytes:
            raise FrameTooLarge(f"{envelope.type!r} message is {len(frame)} bytes, over the limit of "
                                f"{self.max_frame_bytes}")
        return frame

    @staticmethod
    def _packed(envelope: Envelope, data: dict[str, Any]) -> bytes:
        try:
            packed: bytes = msgpack.packb(data, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as exc:
            raise DecodeError(f"cannot encode {envelope.type!r} message: {exc}") from exc
        return packed

    def decode(self, frame: bytes, *, stream: str | None = None) -> Envelope:
        """Unpack and validate a frame (read from ``stream``), or raise a ProtocolError that says what is wrong."""
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
        check_shape(data, size=len(frame))  # before anything walks it: too deep or too many values is a LimitExceeded
        self._check_header(data)
        if self.keyring is not None:
            self._check_signature(data, stream)
        else:
            data.pop("mac", None)  # unchecked, like a signature; the envelope has no field for these
            data.pop("bsig", None)
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

    def _check_signature(self, data: dict[str, Any], stream: str | None) -> None:
        assert self.keyring is not None
        proofs = {name: data.pop(name) for name in _PROOFS if name in data}
        signer = data.get("signer")
        if not isinstance(signer, str) or not signer or not proofs:
            raise BadSignature("message is not signed")
        if len(proofs) > 1:
            raise BadSignature("message carries both a signature and a MAC" if proofs.keys() == {"sig", "mac"}
                               else f"message carries more than one proof: {' and '.join(sorted(proofs))}")
        [(proof, tag)] = proofs.items()
        if proof != "bsig" and not isinstance(tag, bytes):  # a batch proof's shape is checked by _batch_root
            raise BadSignature("message is not signed")
        kind = data["body"]["type"]
        check_sender(kind, signer, stream)  # cheap, and says more than "bad signature"
        payload = msgpack.packb(data, use_bin_type=True)
        if proof == "sig":
            self.keyring.verify(signer, tag, payload)
        elif proof == "bsig":
            signature, signed = _batch_root(tag, payload)
            self.keyring.verify_once(signer, signature, signed)
        else:
            reader = sole_reader(kind)
            if reader is None:
                raise BadSignature(f"{kind!r} messages must be signed: only messages with one reader may carry a MAC")
            self.keyring.check_mac(signer, reader, tag, payload)


_PROOFS = ("sig", "mac", "bsig")


def _batch_root(tag: Any, payload: bytes) -> tuple[bytes, bytes]:
    """The signature of a batch message's ``bsig`` and the bytes it must sign, or BadSignature for a malformed one."""
    if not (isinstance(tag, list) and len(tag) == 4):
        raise BadSignature("batch proof must be [signature, index, size, path]")
    signature, index, size, path = tag
    if (not isinstance(signature, bytes) or type(index) is not int or type(size) is not int
            or not isinstance(path, list) or not all(isinstance(h, bytes) and len(h) == 32 for h in path)):
        raise BadSignature("batch proof must be [signature, index, size, path of 32-byte hashes]")
    root = batch_proof.root_of(batch_proof.leaf_hash(payload), index, size, path)
    if root is None:
        raise BadSignature(f"batch proof's path does not fit message {index} of {size}")
    return signature, batch_proof.signed_root(size, root)


def _first_errors(exc: ValidationError, limit: int = 3) -> str:
    parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:limit]]
    more = exc.error_count() - limit
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


def _bare(error: ProtocolError) -> ProtocolError:
    """``error`` without its traceback, to be handed back instead of raised.

    Its traceback holds the frames that made it, whose locals (the message, its encoding) lead back to it: a
    reference cycle that only a full collection frees, and the manager's big runs produce such refusals.
    """
    return error.with_traceback(None)


def _with_last_entry(packed: bytes, key: str, value: bytes) -> bytes | None:
    """``packed`` (a msgpack map of fewer than 15 entries) with ``key: value`` added as its last entry: the bytes
    ``packb`` gives for the map with the entry added, without packing the rest a second time (the signed payload
    is most of the frame). None for a map of other size, which the caller packs whole."""
    if not packed or packed[0] & 0xF0 != 0x80 or packed[0] & 0x0F >= 15:
        return None
    return b"".join((bytes((packed[0] + 1,)), packed[1:], msgpack.packb(key), msgpack.packb(value, use_bin_type=True)))
