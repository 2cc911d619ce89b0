"""What an attacker holds: redis-py, msgpack and the key names in docs/bus.md. Nothing of the project's client.

Frames are built as plain maps and added with XADD, so the manager meets them exactly as it would
meet a hostile process's frames. Where a test gives the attacker a stolen private key (a file of the
session keyring, ``ORCH_KEYS``), ``sign`` signs with it the way the protocol does: Ed25519 over the
msgpack of the envelope without ``sig``, and ``mac`` makes a reply's MAC for the manager the way
docs/security.md specifies it (X25519 of the stolen key with the manager's public key).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import uuid
from functools import cache
from pathlib import Path
from typing import Any

import msgpack
import redis
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from nacl import bindings as sodium

NS = "orch"


def stream_key(stream: str) -> str:
    """The Redis key of a bus stream (docs/bus.md): tasks/results per capability, the rest by name."""
    kind, _, cap = stream.partition(".")
    if kind in ("tasks", "results") and cap:
        return f"{NS}:{{cap.{cap}}}:{kind}"
    return f"{NS}:{{s.{stream}}}:stream"


def dead_key(stream: str) -> str:
    return stream_key(stream) + ":dead"


def envelope(body: dict[str, Any], *, run_id: str = "", task_id: str = "", attempt: int = 0,
             sender: str = "attacker") -> dict[str, Any]:
    """An envelope as a map, the way the protocol lays it out."""
    return {"v": 1, "msg_id": uuid.uuid4().hex, "run_id": run_id, "task_id": task_id, "attempt": attempt,
            "sender": sender, "time": time.time(), "trace": {}, "signer": "", "body": body}


def pack(data: Any) -> bytes:
    return msgpack.packb(data, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(frame: bytes) -> Any:
    return msgpack.unpackb(frame, raw=False)


@cache
def _private_key(ident: str) -> Any:
    role, _, name = ident.partition(":")
    path = Path(os.environ["ORCH_KEYS"]) / (f"{role}.{name}.key" if name else f"{role}.key")
    return load_pem_private_key(path.read_bytes(), password=None)


def sign(data: dict[str, Any], ident: str) -> dict[str, Any]:
    """The envelope signed with the stolen key of ``ident`` (``operator:tests``, ``worker:x``...)."""
    data = {k: v for k, v in data.items() if k != "sig"}
    data["signer"] = ident
    data["sig"] = _private_key(ident).sign(pack(data))
    return data


def batch_sign(datas: list[dict[str, Any]], ident: str) -> list[dict[str, Any]]:
    """The envelopes signed as one batch with the stolen key of ``ident``, as docs/security.md lays it out.

    RFC 9162's Merkle tree with BLAKE2b-256 (leaf 0x00 || msgpack without proofs, node 0x01 || left ||
    right, split at the largest power of two below the count); Ed25519 over ``orchestrator batch v1``,
    a zero byte, the count (4 bytes, big-endian) and the root; ``bsig`` = [signature, index, count, path].
    """
    def h(data: bytes) -> bytes:
        return hashlib.blake2b(data, digest_size=32).digest()

    def build(leaves: list[bytes]) -> tuple[bytes, list[list[bytes]]]:
        if len(leaves) == 1:
            return leaves[0], [[]]
        k = 1 << ((len(leaves) - 1).bit_length() - 1)
        (left, lpaths), (right, rpaths) = build(leaves[:k]), build(leaves[k:])
        return h(b"\x01" + left + right), [[*p, right] for p in lpaths] + [[*p, left] for p in rpaths]

    unsigned = [{k: v for k, v in d.items() if k not in ("sig", "mac", "bsig")} | {"signer": ident} for d in datas]
    root, paths = build([h(b"\x00" + pack(d)) for d in unsigned])
    signature = _private_key(ident).sign(b"orchestrator batch v1\x00" + len(datas).to_bytes(4, "big") + root)
    return [d | {"bsig": [signature, i, len(datas), path]} for i, (d, path) in enumerate(zip(unsigned, paths, strict=True))]


def mac(data: dict[str, Any], ident: str, *, key_of: str | None = None, reader: str = "manager") -> dict[str, Any]:
    """The envelope with a MAC for ``reader`` in the name of ``ident``, made with the stolen key of ``key_of``.

    The key derivation of docs/security.md: BLAKE2b (person ``orch.mac.v1``) over the X25519 secret
    of the sender's and the reader's keys, the sender's and reader's Ed25519 public keys and
    ``sender>reader``; the tag is BLAKE2b keyed with it over the msgpack without ``sig``/``mac``.
    """
    data = {k: v for k, v in data.items() if k not in ("sig", "mac")}
    data["signer"] = ident
    public, secret = sodium.crypto_sign_seed_keypair(_private_key(key_of or ident).private_bytes_raw())
    keys = json.loads((Path(os.environ["ORCH_KEYS"]) / "keyring.json").read_text())["keys"]
    reader_public = base64.b64decode(keys[reader]["public"])
    shared = sodium.crypto_scalarmult(sodium.crypto_sign_ed25519_sk_to_curve25519(secret),
                                      sodium.crypto_sign_ed25519_pk_to_curve25519(reader_public))
    key = hashlib.blake2b(shared + public + reader_public + f"{ident}>{reader}".encode(), digest_size=32,
                          person=b"orch.mac.v1").digest()
    data["mac"] = hashlib.blake2b(pack(data), key=key, digest_size=32).digest()
    return data


def signed(body: dict[str, Any], ident: str, **header: Any) -> bytes:
    """A signed frame: ``envelope(body, **header)`` signed as ``ident``."""
    return pack(sign(envelope(body, **header), ident))


def add(r: redis.Redis, stream: str, frame: bytes) -> str:
    """XADD one frame to a bus stream."""
    entry_id: Any = r.xadd(stream_key(stream), {"f": frame})
    return str(entry_id.decode())


def assigns(r: redis.Redis, capability: str) -> list[dict[str, Any]]:
    """Every assign the manager sent to a capability (what a worker of it would read)."""
    out = []
    entries: Any = r.xrange(stream_key(f"tasks.{capability}"))
    for _, fields in entries:
        data = msgpack.unpackb(fields[b"f"], raw=False)
        if data["body"]["type"] == "assign":
            out.append(data)
    return out


def dead_letters(r: redis.Redis, stream: str) -> list[dict[str, bytes]]:
    """The dead letters of a stream: id, reason, f (the frame), n, t."""
    entries: Any = r.xrange(dead_key(stream))
    return [{k.decode(): v for k, v in fields.items()} for _, fields in entries]


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value
