"""Make a scripted answer obey the request's structured-output constraint."""

from __future__ import annotations

import json
from typing import Any

import jsonschema

__all__ = ("conform", "minimal_instance")


def minimal_instance(schema: dict[str, Any]) -> Any:
    """A small valid instance: required properties, first enum member, short strings."""
    if "const" in schema:
        return schema["const"]
    if "enum" in schema:
        return schema["enum"][0]
    for key in ("anyOf", "oneOf"):
        if schema.get(key):
            return minimal_instance(schema[key][0])
    if schema.get("allOf"):
        merged: dict[str, Any] = {}
        for part in schema["allOf"]:
            merged.update(part)
        return minimal_instance(merged)
    kind = schema.get("type", "object" if "properties" in schema else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        props = schema.get("properties", {})
        return {name: minimal_instance(props.get(name, {})) for name in schema.get("required", [])}
    if kind == "array":
        item = minimal_instance(schema.get("items", {}))
        return [item] * int(schema.get("minItems", 0))
    if kind in ("integer", "number"):
        low = schema.get("minimum", schema.get("exclusiveMinimum", 0))
        return int(low) + (1 if "exclusiveMinimum" in schema else 0) if kind == "integer" else low
    if kind == "boolean":
        return False
    if kind == "null":
        return None
    return "x" * int(schema.get("minLength", 0)) if "minLength" in schema else "simulated"


def conform(answer: str | Any, schema: dict[str, Any] | None) -> str:
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
    try:
        jsonschema.validate(value, schema)
    except (jsonschema.ValidationError, jsonschema.SchemaError):
        value = minimal_instance(schema)
    return json.dumps(value)
