"""What an attacker holds: redis-py, msgpack and the key names in docs/bus.md. Nothing of the project's client.

Frames are built as plain maps and added with XADD, so the manager meets them exactly as it would
meet a hostile process's frames.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import msgpack
import redis

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
            "sender": sender, "time": time.time(), "trace": {}, "sig": None, "body": body}


def pack(data: Any) -> bytes:
    return msgpack.packb(data, use_bin_type=True)  # type: ignore[no-any-return]


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
