"""Shape limits on data from outside: how deep and how many items, checked before anything walks it.

Decoded frames, worker outputs and job data come from whoever can write to Redis or a job file.
Nested deeply enough, they crash the code that later serializes them (pydantic's JSON serializer
stops at 255 levels; ``repr`` at Python's recursion limit), so every entry point checks their shape
first, without recursion:

- the codec checks every decoded frame against ``FRAME_LIMITS`` (a failure dead-letters the frame);
- the manager checks a worker's output against ``OUTPUT_LIMITS`` (a failure fails the attempt);
- a job's data (task input, config, expect) is checked against ``JOB_LIMITS`` when it is loaded.

Output limits also require JSON data: bytes (which may not be UTF-8) and msgpack extension types
cannot be stored in the history, so they fail the attempt instead of the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from protocol.errors import DecodeError

__all__ = ("FRAME_LIMITS", "JOB_LIMITS", "OUTPUT_LIMITS", "LimitExceeded", "ShapeLimits", "check_shape")


class LimitExceeded(DecodeError):
    """Data deeper or larger than a limit, or not JSON data where JSON is required."""


@dataclass(frozen=True, slots=True)
class ShapeLimits:
    """How deep containers may nest, how many values (containers, items, keys) there may be in all."""

    max_depth: int
    max_items: int
    json_only: bool = False  # only None, bool, int, float, str, lists and string-keyed maps


# A frame is at most 1 MiB, so it holds at most about a million values; deeper than 512 is never a
# real message (outputs within it are held to 64 below, the envelope adds a handful).
FRAME_LIMITS = ShapeLimits(max_depth=512, max_items=1 << 20)
# Worker outputs and job data: they are stored as JSON, shown, and sent on to dependent tasks.
OUTPUT_LIMITS = ShapeLimits(max_depth=64, max_items=100_000, json_only=True)
# A whole job: a task's input, config or expect sits four levels down (job, tasks, task, field).
JOB_LIMITS = ShapeLimits(max_depth=OUTPUT_LIMITS.max_depth + 4, max_items=1 << 20)

_SCALARS = (str, int, float, bool, type(None))


def check_shape(value: Any, limits: ShapeLimits = FRAME_LIMITS, *, what: str = "frame") -> None:
    """Raise LimitExceeded naming ``what`` and the limit when ``value`` is deeper or larger than ``limits``."""
    items = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        items += 1
        if items > limits.max_items:
            raise LimitExceeded(f"{what} holds more than {limits.max_items} values (limit max_items)")
        if isinstance(node, dict):
            children: Any = node.values()
            if limits.json_only and not all(isinstance(k, str) for k in node):
                raise LimitExceeded(f"{what} has a map key that is not a string; it must be JSON data")
            items += len(node)  # the keys
        elif isinstance(node, list | tuple):
            children = node
        else:
            if limits.json_only and not isinstance(node, _SCALARS):
                raise LimitExceeded(f"{what} holds a {type(node).__name__} value; it must be JSON data")
            continue
        if depth > limits.max_depth:  # containers count as levels; what they hold does not
            raise LimitExceeded(f"{what} nests deeper than {limits.max_depth} levels (limit max_depth)")
        stack.extend((child, depth + 1) for child in children)
