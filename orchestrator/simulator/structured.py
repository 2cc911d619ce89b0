"""Make a scripted answer obey the request's structured-output constraint."""

from __future__ import annotations

import json
from typing import Any

import jsonschema

__all__ = ("conform", "minimal_instance")

_MAX_DEPTH = 32


def minimal_instance(schema: dict[str, Any] | bool, root: dict[str, Any] | None = None, depth: int = 0) -> Any:
    """A small valid instance: required properties, first enum member, short strings.

    Local ``$ref``s are followed (``root`` is the whole schema) down to a bounded depth.
    """
    if not isinstance(schema, dict) or depth > _MAX_DEPTH:
        return None
    root = schema if root is None else root
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#"):
        target: Any = root
        for part in [p for p in ref[1:].split("/") if p]:
            target = target.get(part.replace("~1", "/").replace("~0", "~"), {}) if isinstance(target, dict) else {}
        return minimal_instance(target, root, depth + 1)
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            return minimal_instance(schema[key][0], root, depth + 1)
    if schema.get("allOf"):
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            merged.update(part)
        return minimal_instance(merged, root, depth + 1)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties", {})
        return {name: minimal_instance(props.get(name, {}), root, depth + 1) for name in schema.get("required", [])}
    if kind == "array":
        item = minimal_instance(schema.get("items", {}), root, depth + 1)
        return [item] * int(schema.get("minItems", 0))
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0))
        return int(low) + (1 if "exclusiveMinimum" in schema else 0) if kind == "integer" else low
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return "x" * int(schema.get("minLength", 0)) if "minLength" in schema else "simulated"


def conform(answer: str | Any, schema: dict[str, Any] | bool | None) -> str:
    """Return JSON text for ``answer`` that validates against ``schema`` (any JSON when schema is None).

    A policy answer that already validates is kept; otherwise the minimal instance is sent, which
    is what a constrained decoder guarantees: valid, not necessarily useful.
    """
    value: Any = answer
    if isinstance(answer, str):
        try:
            value = json.loads(answer)
        except ValueError:
            value = None if schema is not None else {"text": answer}
    if schema is None:
        return json.dumps(value)
    if isinstance(schema, bool):
        return json.dumps(value if schema else None)
    try:
        jsonschema.validate(value, schema)
    except (jsonschema.ValidationError, jsonschema.SchemaError, RecursionError):
        value = minimal_instance(schema)
    return json.dumps(value)
