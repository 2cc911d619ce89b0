"""Make a scripted answer obey the request's structured-output constraint."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Iterator
from typing import Any

import jsonschema

from .schema_size import SmallestSize, resolve_ref

__all__ = ("MAX_ANSWER_CHARS", "conform", "minimal_instance")

MAX_ANSWER_CHARS = 1 << 20  # a bigger minimal instance is cut here; the caller's max_tokens cuts it sooner
_MAX_DEPTH = 200  # below Python's recursion limit; schemas are checked to nest far less


def minimal_instance(schema: dict[str, Any] | bool, root: dict[str, Any] | None = None, *,
                     max_chars: int = MAX_ANSWER_CHARS) -> Any:
    """A small valid instance: required properties, first satisfiable alternative, short strings.

    Local ``$ref``s are followed (``root`` is the whole schema); an alternative that could only
    recurse forever is skipped. Past ``max_chars`` of JSON, arrays and strings are cut short and
    further properties left out: the value is then too long for any ``max_tokens`` anyway, and the
    answer ends with ``finish_reason="length"`` as a constrained decoder's would.
    """
    return _Builder(schema if root is None else root, max_chars).build(schema, frozenset(), 0)


class _Builder:
    def __init__(self, root: Any, max_chars: int) -> None:
        self.root = root
        self.left = max_chars
        self.sizes = SmallestSize(root)

    def build(self, schema: Any, path: frozenset[int], depth: int) -> Any:
        if not isinstance(schema, dict) or depth > _MAX_DEPTH or self.left <= 0:
            return None
        ref = schema.get("$ref")
        if isinstance(ref, str):
            target = resolve_ref(self.root, ref)
            if target is None or id(target) in path:
                return None
            return self.build(target, path | {id(target)}, depth + 1)
        if "const" in schema:
            return self._spend(schema["const"])
        if "enum" in schema:
            values = schema["enum"]
            return self._spend(values[0]) if isinstance(values, list) and values else None
        for key in ("anyOf", "oneOf"):
            parts = schema.get(key)
            if isinstance(parts, list) and parts:
                finite = [p for p in parts if self.sizes.of(p, path) < math.inf]  # no way back into the path
                return self.build(finite[0] if finite else parts[0], path, depth + 1)
        parts = schema.get("allOf")
        if isinstance(parts, list) and parts:
            merged: dict[str, Any] = {}
            for part in parts:
                if isinstance(part, dict):
                    merged.update(part)
            return self.build(merged, path, depth + 1)
        return self._typed(schema, path, depth)

    def _typed(self, schema: dict[str, Any], path: frozenset[int], depth: int) -> Any:
        kind = schema.get("type", "object" if "properties" in schema else "string")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind == "object":
            props = schema.get("properties")
            props = props if isinstance(props, dict) else {}
            required = schema.get("required")
            required = required if isinstance(required, list) else []
            self.left -= 2
            out: dict[str, Any] = {}
            for name in (n for n in required if isinstance(n, str)):
                if self.left <= 0:
                    break
                self.left -= len(name) + 4
                out[name] = self.build(props.get(name, {}), path, depth + 1)
            return out
        if kind == "array":
            count = _positive(schema.get("minItems"))
            if not count:
                self.left -= 2
                return []
            item = self.build(schema.get("items", {}), path, depth + 1)
            each = len(json.dumps(item)) + 2
            count = min(count, max(1, self.left // each))
            self.left -= count * each
            return [item] * count
        if kind in ("integer", "number"):
            low = schema.get("minimum", schema.get("exclusiveMinimum", 0))
            low = low if isinstance(low, (int, float)) and not isinstance(low, bool) else 0
            value = int(low) + (1 if "exclusiveMinimum" in schema else 0) if kind == "integer" else low
            return self._spend(value)
        if kind == "boolean":
            return self._spend(False)
        if kind == "null":
            return self._spend(None)
        if "minLength" in schema:
            return self._spend("x" * min(_positive(schema["minLength"]), max(self.left, 0)))
        return self._spend("simulated")

    def _spend(self, value: Any) -> Any:
        self.left -= len(json.dumps(value))
        return value


def _positive(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _ignore(*_: Any) -> Iterator[jsonschema.ValidationError]:
    return iter(())


@functools.lru_cache(maxsize=16)
def _answer_validator(cls: type[jsonschema.protocols.Validator]) -> type[jsonschema.protocols.Validator]:
    """``cls`` without ``pattern``/``patternProperties``: a request's regex never runs over an answer.

    A pattern such as ``^(a|a)*$`` against text the request also supplied would hold the event loop
    for as long as the backtracking takes; the simulator does not generate pattern-matching strings
    anyway (a real constrained decoder does).
    """
    extended: type[jsonschema.protocols.Validator] = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
        cls, {"pattern": _ignore, "patternProperties": _ignore})
    return extended


def _valid(value: Any, schema: dict[str, Any]) -> bool:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        return bool(_answer_validator(cls)(schema).is_valid(value))
    except Exception:  # a reference the validator cannot follow, deep recursion: use the minimal instance
        return False


def conform(answer: str | Any, schema: dict[str, Any] | bool | None, *, max_chars: int = MAX_ANSWER_CHARS) -> str:
    """Return JSON text for ``answer`` that validates against ``schema`` (any JSON when schema is None).

    A policy answer that already validates is kept; otherwise the minimal instance is sent, which
    is what a constrained decoder guarantees: valid, not necessarily useful. ``schema`` has passed
    ``validation.check_json_schema``, which bounds what validating and building can cost.
    """
    value: Any = answer
    if isinstance(answer, str):
        try:
            value = json.loads(answer)
        except (ValueError, RecursionError):
            value = None if schema is not None else {"text": answer}
    if schema is None:
        return json.dumps(value)
    if isinstance(schema, bool):
        return json.dumps(value if schema else None)
    if not _valid(value, schema):
        value = minimal_instance(schema, max_chars=max_chars)
    return json.dumps(value)
