"""Hostile frames for the fuzz test: random bytes and msgpack-level mutations of valid frames, from a seed.

Every frame is built the way an attacker would build it (plain maps packed with msgpack), most of
them signed with the key an honest sender on that stream holds and then changed, so the signature
check itself is under attack; others are unsigned, forged, signed by the wrong role, or malformed
by a key holder. The generator keeps only frames the protocol's codec (verifying, with the session
keyring) refuses, so each one must end in the dead letters; the few mutations that still make a
valid message are counted and left out.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import msgpack

from protocol.codec import Codec
from protocol.errors import ProtocolError
from tests.security.attacker import envelope, nested, pack, sign

Mutation = Callable[[random.Random, dict[str, Any], str], bytes]


def valid_bodies(stream: str, rng: random.Random) -> dict[str, Any]:
    """A valid envelope (as a map) of a kind the stream carries."""
    if stream == "jobs":
        job = {"goal": rng.choice(["g", "sort", "x" * 50]),
               "tasks": [{"id": f"t{i}", "capability": rng.choice(["alpha", "beta"]), "input": rng.randint(0, 9),
                          "depends_on": [f"t{i - 1}"] if i else []} for i in range(rng.randint(1, 3))]}
        return envelope({"type": "submit", "job": job, "source": "fuzz.yaml"}, run_id=f"fuzz{rng.randrange(10**6)}")
    if stream == "overrides":
        action = rng.choice(["approve", "reject", "redo", "accept", "cancel"])
        return envelope({"type": "override", "action": action, "feedback": "f", "by": "me"}, run_id="r", task_id="t")
    body: dict[str, Any] = rng.choice([
        {"type": "done", "output": rng.choice([1, "text", [1, 2, {"a": None}], {"k": [True, 1.5]}]), "tokens": 3,
         "duration_s": 0.1, "self_check": False},
        {"type": "failed", "error": "boom", "error_type": "RuntimeError", "retryable": True},
        {"type": "heartbeat", "in_flight": 2},
        {"type": "progress", "message": "half", "fraction": 0.5},
        {"type": "verify_response", "verdict": {"passed": True, "feedback": "", "corrections": [],
                                                "verifier": "w", "tokens": 0}},
    ])
    return envelope(body, run_id="r", task_id="t", attempt=1, sender="w")


def _paths(data: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _paths(v, (*prefix, i))


def _set(data: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    node = data
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return data


def _odd_value(rng: random.Random) -> Any:
    return rng.choice([None, True, -1, 2**63, -(2**63), 1.5e308, float("nan"), "", "x" * rng.randint(1, 300),
                       b"\xff\x00", [], [None] * 3, {}, {"type": "done"}, {"": 1}, msgpack.ExtType(7, b"z"),
                       nested(rng.randint(2, 40))])


# Each mutation gets a valid envelope (a map, unsigned) and the identity that may sign it on the stream.


def random_bytes(rng: random.Random, data: dict[str, Any], ident: str) -> bytes:
    return rng.randbytes(rng.randint(0, 80))


def flip_bytes(rng: random.Random, data: dict[str, Any], ident: str) -> bytes:
    frame = bytearray(pack(sign(data, ident)))  # a signed frame, changed on the way
    for _ in range(rng.randint(1, 4)):
        frame[rng.randrange(len(frame))] ^= rng.randint(1, 255)
    return bytes(frame)


def truncate(rng: random.Random, data: dict[str, Any], ident: str) -> bytes:
    frame = pack(sign(data, ident))
    return frame[:rng.randrange(len(frame))]


def trailing_garbage(rng: random.Random, data: dict[str, Any], ident: str) -> bytes:
    return pack(sign(data, ident)) + rng.randbytes(rng.randint(1, 8))


def _signed_before_or_after(rng: random.Random, data: dict[str, Any], ident: str,
                            change: Callable[[dict[str, Any]], Any]) -> bytes:
    """Half the time the change comes after signing (the signature must fail), half the time before (a key
    holder sending a malformed message: the signature holds and validation must refuse it)."""
    if rng.random() < 0.5:
        return pack(change(sign(data, ident)))
    changed = change(data)
    return pack(sign(changed, ident) if isinstance(changed, dict) else changed)


def change_type(rng: random.Random, data: dict[str, Any], ident: str) -> bytes:
    path = rng.choice([p for p in _paths(data) if p and p[0] not in ("signer", "sig")])
    return _signed_before_or_after(rng, data, ident, lambda d: _set(d, path, _odd_value(rng)))


def drop_key(rng: random.Random, data: dict[str, Any], ident: str) -> bytes:
    def change(d: dict[str, Any]) -> dict[str, Any]:
        maps = [p for p in _paths(d) if isinstance(_get(d, p), dict) and _get(d, p)]
        target = _get(d, rng.choice(maps))
        del target[rng.choice(list(target))]
        return d

    return _signed_before_or_after(rng, data, ident, change)


def unknown_key(rng: random.Random, data: dict[str, Any], ident: str) -> bytes:
    def change(d: dict[str, Any]) -> dict[str, Any]:
        maps = [p for p in _paths(d) if isinstance(_get(d, p), dict)]
        _get(d, rng.choice(maps))[rng.choice(["extra", "admin", "__class__", "sig2"])] = _odd_value(rng)
        return d

    return _signed_before_or_after(rng, data, ident, change)


def non_string_key(rng: random.Random, data: dict[str, Any], ident: str) -> bytes:
    data = sign(data, ident)
    data["body"][rng.choice([1, -5, 2.5])] = "x"  # msgpack allows any key type; the protocol does not
    return pack(data)


def deepen(rng: random.Random, data: dict[str, Any], ident: str) -> bytes:
    # Spliced in as raw bytes (one-element arrays, 0x91): msgpack's packer stops at 511 levels, an attacker does not.
    marker = "\x00deepen-here\x00"
    path = rng.choice([p for p in _paths(data) if p and p[0] not in ("signer", "sig")])
    frame = pack(sign(_set(data, path, marker), ident))
    return frame.replace(pack(marker), b"\x91" * rng.randint(520, 3000) + b"\x01")


def wrong_header(rng: random.Random, data: dict[str, Any], ident: str) -> bytes:
    choice = rng.randrange(4)
    if choice == 3:
        return pack(rng.choice([[sign(data, ident)], "frame", 42, None, [1, 2, 3]]))

    def change(d: dict[str, Any]) -> dict[str, Any]:
        if choice == 0:
            d["v"] = rng.choice([0, 2, "1", None, 1.0001])
        elif choice == 1:
            d["body"]["type"] = rng.choice(["shell", "", "DONE", 7, None, "run_events2"])
        else:
            d["body"] = _odd_value(rng)
        return d

    return _signed_before_or_after(rng, data, ident, change)


def unsigned(rng: random.Random, data: dict[str, Any], ident: str) -> bytes:
    if rng.random() < 0.5:
        data["signer"] = ident  # claims a signer, carries no signature
    return pack(data)


def forged_signature(rng: random.Random, data: dict[str, Any], ident: str) -> bytes:
    data["signer"] = rng.choice([ident, "manager", "operator:root", "worker:x", ""])
    data["sig"] = rng.randbytes(rng.choice([0, 1, 63, 64, 65]))
    return pack(data)


def wrong_signer(rng: random.Random, data: dict[str, Any], ident: str) -> bytes:
    # Properly signed, by a key that may not send this message on this stream.
    others = [i for i in ("manager", "operator:tests", "worker:x", "worker:y", "worker:c") if i != ident]
    return pack(sign(data, rng.choice(others)))


def oversized(rng: random.Random, data: dict[str, Any], ident: str) -> bytes:
    data["body"]["padding"] = "x" * (1024 * 1024 + rng.randint(1, 100))
    return pack(sign(data, ident))


MUTATIONS: tuple[tuple[Mutation, int], ...] = (
    (random_bytes, 8), (flip_bytes, 18), (truncate, 12), (trailing_garbage, 4), (change_type, 18), (drop_key, 7),
    (unknown_key, 7), (non_string_key, 3), (deepen, 3), (wrong_header, 8), (unsigned, 4), (forged_signature, 4),
    (wrong_signer, 4),
)


def _get(data: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        data = data[part]
    return data


def signer_of(stream: str) -> str:
    """The identity whose key signs what an honest process publishes on ``stream``."""
    return f"worker:{stream.removeprefix('results.')}" if stream.startswith("results.") else "operator:tests"


def hostile_frames(stream: str, count: int, rng: random.Random, codec: Codec,
                   oversized_every: int = 2500) -> tuple[list[bytes], dict[str, int]]:
    """``count`` frames for ``stream`` that ``codec`` refuses, and how many of each mutation (``valid``: left out)."""
    frames: list[bytes] = []
    made: dict[str, int] = {"valid": 0}
    mutations, weights = zip(*MUTATIONS, strict=True)
    while len(frames) < count:
        if len(frames) % oversized_every == oversized_every - 1:
            mutation: Mutation = oversized
        else:
            mutation = rng.choices(mutations, weights)[0]
        frame = mutation(rng, valid_bodies(stream, rng), signer_of(stream))
        try:
            codec.decode(frame, stream=stream)
        except ProtocolError:
            frames.append(frame)
            made[mutation.__name__] = made.get(mutation.__name__, 0) + 1
        else:
            made["valid"] += 1
    return frames, made
