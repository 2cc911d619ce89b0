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
from itertools import chain
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
# A whole job: a task's input, config or expect sits four levels down (job, tasks, task, field). A task as a
# submission sends it is ~16 values before its data, so a 100,000-task job is ~1.6 million: the limit bounds a
# staged job (orchestrator/staged_jobs.py) well past that, not the 1 MiB frame it once had to fit.
JOB_LIMITS = ShapeLimits(max_depth=OUTPUT_LIMITS.max_depth + 4, max_items=1 << 24)

_CONTAINERS = (dict, list, tuple)
_CONTAINER_TYPES = frozenset(_CONTAINERS)
_JSON_TYPES = frozenset({str, int, float, bool, type(None)}) | _CONTAINER_TYPES
_PLAIN_TYPES = _JSON_TYPES | {bytes}  # what msgpack decodes to, extension types aside


def check_shape(value: Any, limits: ShapeLimits = FRAME_LIMITS, *, what: str = "frame", size: int | None = None) -> int:
    """Raise LimitExceeded naming ``what`` and the limit when ``value`` is deeper or larger than ``limits``; else
    return how many values it holds (at most ``size`` when that settled it).

    ``size``, the length of the msgpack frame ``value`` was decoded from, settles small frames at
    once: every container and every value takes at least one byte. Otherwise the data is walked
    level by level, so its depth never reaches the interpreter's stack. This runs on every large
    decoded frame: a level's values are gathered and sorted by type in C (``chain``, ``map``,
    ``set``); Python looks at values one by one only where a level mixes containers and scalars.
    """
    if size is not None and size <= limits.max_depth and size <= limits.max_items and not limits.json_only:
        return size
    if limits.json_only and type(value) not in _JSON_TYPES:
        raise LimitExceeded(f"{what} holds a {type(value).__name__} value; it must be JSON data")
    level: list[Any] = [value] if isinstance(value, _CONTAINERS) else []
    level_kinds: set[type] = {type(value)}
    items, depth = 1, 0
    while level:
        depth += 1
        if depth > limits.max_depth:  # containers count as levels; what they hold does not
            raise LimitExceeded(f"{what} nests deeper than {limits.max_depth} levels (limit max_depth)")
        if level_kinds == {dict}:
            values = list(chain.from_iterable(map(dict.values, level)))
        elif level_kinds <= {list, tuple}:
            values = list(chain.from_iterable(level))
        else:
            values = list(chain.from_iterable([n.values() if isinstance(n, dict) else n for n in level]))
        items += len(values)
        if items > limits.max_items:
            raise LimitExceeded(f"{what} holds more than {limits.max_items} values (limit max_items)")
        kinds = set(map(type, values))
        if limits.json_only:
            _check_json(level, values, kinds, what)
        if kinds <= _PLAIN_TYPES:
            level_kinds = kinds & _CONTAINER_TYPES
            if level_kinds == kinds:
                level = values
            else:
                level = [v for v in values if type(v) in _CONTAINER_TYPES] if level_kinds else []
        else:  # subclasses, extension types (a tuple): the exact test, value by value
            level = [v for v in values if isinstance(v, _CONTAINERS)]
            level_kinds = set(map(type, level))
    return items


def _check_json(level: list[Any], values: list[Any], kinds: set[type], what: str) -> None:
    """Only JSON data: string keys; no bytes (maybe not UTF-8), extension types or other objects."""
    maps = [n for n in level if isinstance(n, dict)]
    if maps and not set(map(type, chain.from_iterable(maps))) <= {str}:
        raise LimitExceeded(f"{what} has a map key that is not a string; it must be JSON data")
    if not kinds <= _JSON_TYPES:
        bad = next(v for v in values if type(v) not in _JSON_TYPES)
        raise LimitExceeded(f"{what} holds a {type(bad).__name__} value; it must be JSON data")
