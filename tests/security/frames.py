"""Hostile frames for the fuzz test: random bytes and msgpack-level mutations of valid frames, from a seed.

Every frame is built the way an attacker would build it (plain maps packed with msgpack). The
generator keeps only frames the protocol's codec refuses, so each one must end in the dead letters;
the few mutations that still make a valid message are counted and left out.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import msgpack

from protocol.codec import Codec
from protocol.errors import ProtocolError
from tests.security.attacker import envelope, nested, pack

Mutation = Callable[[random.Random, dict[str, Any]], bytes]


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


def random_bytes(rng: random.Random, data: dict[str, Any]) -> bytes:
    return rng.randbytes(rng.randint(0, 80))


def flip_bytes(rng: random.Random, data: dict[str, Any]) -> bytes:
    frame = bytearray(pack(data))
    for _ in range(rng.randint(1, 4)):
        frame[rng.randrange(len(frame))] ^= rng.randint(1, 255)
    return bytes(frame)


def truncate(rng: random.Random, data: dict[str, Any]) -> bytes:
    frame = pack(data)
    return frame[:rng.randrange(len(frame))]


def trailing_garbage(rng: random.Random, data: dict[str, Any]) -> bytes:
    return pack(data) + rng.randbytes(rng.randint(1, 8))


def change_type(rng: random.Random, data: dict[str, Any]) -> bytes:
    path = rng.choice(list(_paths(data))[1:])
    return pack(_set(data, path, _odd_value(rng)))


def drop_key(rng: random.Random, data: dict[str, Any]) -> bytes:
    maps = [p for p in _paths(data) if isinstance(_get(data, p), dict) and _get(data, p)]
    target = _get(data, rng.choice(maps))
    del target[rng.choice(list(target))]
    return pack(data)


def unknown_key(rng: random.Random, data: dict[str, Any]) -> bytes:
    maps = [p for p in _paths(data) if isinstance(_get(data, p), dict)]
    _get(data, rng.choice(maps))[rng.choice(["extra", "admin", "__class__", "sig2"])] = _odd_value(rng)
    return pack(data)


def non_string_key(rng: random.Random, data: dict[str, Any]) -> bytes:
    data["body"][rng.choice([1, -5, 2.5])] = "x"  # msgpack allows any key type; the protocol does not
    return msgpack.packb(data, use_bin_type=True, strict_types=False)  # type: ignore[no-any-return]


def deepen(rng: random.Random, data: dict[str, Any]) -> bytes:
    # Spliced in as raw bytes (one-element arrays, 0x91): msgpack's packer stops at 511 levels, an attacker does not.
    marker = "\x00deepen-here\x00"
    path = rng.choice(list(_paths(data))[1:])
    return pack(_set(data, path, marker)).replace(pack(marker), b"\x91" * rng.randint(520, 3000) + b"\x01")


def wrong_header(rng: random.Random, data: dict[str, Any]) -> bytes:
    choice = rng.randrange(4)
    if choice == 0:
        data["v"] = rng.choice([0, 2, "1", None, 1.0001])
    elif choice == 1:
        data["body"]["type"] = rng.choice(["shell", "", "DONE", 7, None, "run_events2"])
    elif choice == 2:
        data["body"] = _odd_value(rng)
    else:
        return pack(rng.choice([[data], "frame", 42, None, [1, 2, 3]]))
    return pack(data)


def oversized(rng: random.Random, data: dict[str, Any]) -> bytes:
    data["body"]["padding"] = "x" * (1024 * 1024 + rng.randint(1, 100))
    return pack(data)


MUTATIONS: tuple[tuple[Mutation, int], ...] = (
    (random_bytes, 10), (flip_bytes, 20), (truncate, 15), (trailing_garbage, 5), (change_type, 20), (drop_key, 8),
    (unknown_key, 8), (non_string_key, 3), (deepen, 3), (wrong_header, 8),
)


def _get(data: Any, path: tuple[Any, ...]) -> Any:
    for part in path:
        data = data[part]
    return data


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
        frame = mutation(rng, valid_bodies(stream, rng))
        try:
            codec.decode(frame)
        except ProtocolError:
            frames.append(frame)
            made[mutation.__name__] = made.get(mutation.__name__, 0) + 1
        else:
            made["valid"] += 1
    return frames, made
