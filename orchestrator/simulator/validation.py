"""Request checks that vLLM 0.33 makes before a request reaches its engine, with its error shapes.

Two kinds of 400, as vLLM sends them:

- ``BadRequestError``: vLLM's own checks (``VLLMValidationError``), with ``param`` naming the field;
- ``Bad Request``: pydantic rejected the body (a wrong type, a bound such as ``seed`` outside int64);
  the message starts ``1 validation error:`` and ``param`` is the field's location (``body.seed``).
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections import OrderedDict
from typing import Any

import jsonschema

from ._http import json_response
from .schema_size import SchemaTooComplex, SmallestSize, resolve_ref, unfolded_nodes

__all__ = (
    "INT64_MAX",
    "INT64_MIN",
    "MAX_JSON_NESTING",
    "MAX_REGEX_CHARS",
    "MAX_SCHEMA_BYTES",
    "MAX_SCHEMA_NODES",
    "HttpError",
    "bad",
    "check_grammar",
    "check_json_schema",
    "check_regex",
    "checked_json_schema",
    "pydantic_error",
)

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
MAX_JSON_NESTING = 64  # vLLM's MAX_STRUCTURED_OUTPUT_JSON_NESTING
MAX_SCHEMA_BYTES = 256 * 1024  # the simulator's own bound: a bigger schema is refused before any work
MAX_REGEX_CHARS = 64 * 1024  # the simulator's own bound, like MAX_SCHEMA_BYTES
MAX_SCHEMA_NODES = 4_000  # subschemas once $refs are followed: bounds the metaschema check and answer validation
_MAX_REF_HOPS = 64


class HttpError(Exception):
    """An error response in vLLM's envelope."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.response = json_response(
            status, {"error": {"message": message, "type": type_, "param": param, "code": status}}
        )


def bad(message: str, param: str | None = None) -> HttpError:
    """A 400 from one of vLLM's own checks."""
    return HttpError(400, message, "BadRequestError", param)


def pydantic_error(kind: str, loc: tuple[str | int, ...], msg: str, value: Any, **ctx: Any) -> HttpError:
    """A 400 the way vLLM reports a body pydantic rejected (``N validation error(s):``)."""
    err: dict[str, Any] = {"type": kind, "loc": loc, "msg": msg, "input": _summarize(value)}
    if ctx:
        err["ctx"] = ctx
    return HttpError(400, f"1 validation error:\n  {err}", "Bad Request", ".".join(str(p) for p in loc))


def _summarize(value: Any) -> Any:
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + "...[truncated]"
    if isinstance(value, (list, dict)):
        return f"<{type(value).__name__} of {len(value)} items>"
    return value


def _nesting(value: Any, limit: int) -> bool:
    """True if ``value`` nests objects/arrays deeper than ``limit`` (iteratively, no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > limit:
                return True
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return False


def _ref_cycle(root: dict[str, Any]) -> str | None:
    """A ``$ref`` that leads back to itself without any structure in between (``{"$ref": "#"}``).

    Such a schema describes no finite value: a grammar compiler (and a validator) would loop on it.
    Recursion through ``properties``/``items`` is fine and is not reported.
    """
    stack: list[Any] = [root]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        ref = node.get("$ref")
        if isinstance(ref, str):
            seen = {id(node)}
            target: Any = node
            for _ in range(_MAX_REF_HOPS):
                nxt = target.get("$ref") if isinstance(target, dict) else None
                if not isinstance(nxt, str):
                    break
                target = resolve_ref(root, nxt)
                if target is None:
                    return f"$ref {nxt!r} does not resolve"
                if id(target) in seen or (isinstance(target, dict) and _only_refs_to(target, seen)):
                    return f"$ref {ref!r} refers to itself"
                seen.add(id(target))
            else:
                return f"$ref {ref!r} is a chain of more than {_MAX_REF_HOPS} references"
        stack.extend(v for k, v in node.items() if k not in ("const", "enum", "default", "examples"))
    return None


def _only_refs_to(node: dict[str, Any], seen: set[int]) -> bool:
    """``node`` combines (allOf/anyOf/oneOf) nothing but the schema being resolved."""
    for key in ("allOf", "anyOf", "oneOf"):
        parts = node.get(key)
        if isinstance(parts, list) and parts and all(isinstance(p, dict) and id(p) in seen for p in parts):
            return True
    return False


_CHECKED: OrderedDict[str, dict[str, Any] | bool] = OrderedDict()  # found valid (agents resend the same few)
_CHECKED_MAX = 256
_CHECKED_LOCK = threading.Lock()  # schemas are checked in worker threads too


def _cache_key(schema: Any) -> str:
    if isinstance(schema, str):
        return "text:" + schema if len(schema) <= MAX_SCHEMA_BYTES else ""
    if isinstance(schema, dict):
        try:
            key = json.dumps(schema, sort_keys=True)
        except (TypeError, ValueError, RecursionError):
            return ""
        return "json:" + key if len(key) <= MAX_SCHEMA_BYTES else ""
    return ""


def checked_json_schema(schema: Any) -> dict[str, Any] | bool | None:
    """The checked form of ``schema`` when it was checked before, else ``None`` (cheap: one lookup)."""
    key = _cache_key(schema)
    with _CHECKED_LOCK:
        found = _CHECKED.get(key) if key else None
        if found is not None:
            _CHECKED.move_to_end(key)
    return found


def check_json_schema(schema: Any, *, param: str = "structured_outputs") -> dict[str, Any] | bool:
    """The schema as vLLM would compile it, or a 400 like vLLM's (xgrammar backend).

    A schema not seen before can cost a few seconds to check (the metaschema check is slow in pure
    Python); ``SimApp`` runs such checks in a worker thread first, so the event loop never waits.
    """
    key = _cache_key(schema)
    found = checked_json_schema(schema)
    if found is not None:
        return found
    checked = _check_json_schema(schema, param)
    if key:
        with _CHECKED_LOCK:
            _CHECKED[key] = checked
            if len(_CHECKED) > _CHECKED_MAX:
                _CHECKED.popitem(last=False)
    return checked


def _check_json_schema(schema: Any, param: str) -> dict[str, Any] | bool:
    if isinstance(schema, str):
        if len(schema) > MAX_SCHEMA_BYTES:
            raise bad(f"The JSON schema is larger than {MAX_SCHEMA_BYTES} bytes.", param)
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise bad("Invalid JSON grammar specification.", param) from exc
    if isinstance(schema, bool):
        return schema
    if not isinstance(schema, dict):
        raise bad("Failed to transform json schema into a grammar: the schema must be an object or a boolean.", param)
    if _nesting(schema, MAX_JSON_NESTING):
        raise bad("The JSON schema is nested too deeply: objects and arrays may nest at most "
                  f"{MAX_JSON_NESTING} levels", param)
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise bad(f"The JSON schema is larger than {MAX_SCHEMA_BYTES} bytes.", param)
    cycle = _ref_cycle(schema)
    if cycle is not None:
        raise bad(f"Failed to transform json schema into a grammar: {cycle}", param)
    try:
        unfolded_nodes(schema, MAX_SCHEMA_NODES)
        smallest = SmallestSize(schema).of(schema)
    except SchemaTooComplex as exc:
        raise bad(f"Failed to transform json schema into a grammar: {exc}", param) from exc
    except RecursionError as exc:
        raise bad("Failed to transform json schema into a grammar: the schema nests too deeply once its $refs are "
                  "followed", param) from exc
    if smallest == math.inf:
        raise bad("Failed to transform json schema into a grammar: the schema allows no finite value (every value "
                  "would have to contain itself through a $ref, or nothing matches)", param)
    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise bad(f"Failed to transform json schema into a grammar: {exc.message}", param) from exc
    return schema


def check_regex(pattern: Any, *, param: str = "structured_outputs") -> str:
    """A regex vLLM could turn into a grammar, or its 400."""
    if not isinstance(pattern, str):
        raise pydantic_error("string_type", ("body", param, "regex"), "Input should be a valid string", pattern)
    if "\x00" in pattern:
        raise bad("structured_outputs.regex must not contain a NUL character ('\\x00')")
    if len(pattern) > MAX_REGEX_CHARS:
        raise bad(f"The regex is longer than {MAX_REGEX_CHARS} characters.", param)
    try:
        re.compile(pattern)  # compiling is linear in the pattern; the simulator never matches it against text
    except re.error as exc:
        raise bad(f"Failed to transform regex into a grammar: {exc}", param) from exc
    except RecursionError as exc:
        raise bad("Failed to transform regex into a grammar: the regex nests too deeply", param) from exc
    return pattern


# An EBNF rule (GBNF / xgrammar syntax): name ::= alternatives
_RULE = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*::=\s*(.+)$")
_LARK_RULE = re.compile(r"^\s*\??[a-z_][\w]*\s*:\s*(.+)$|^\s*[A-Z_][A-Z_0-9]*\s*:\s*(.+)$")
_REFERENCE = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|([A-Za-z_][\w-]*)')


def check_grammar(grammar: Any, *, param: str = "structured_outputs") -> str:
    """A grammar (EBNF with ``root ::= ...``, or Lark with ``start: ...``) that parses, or vLLM's 400.

    The simulator checks the shape, not the language: every non-empty line continues a rule, every
    rule a grammar refers to is defined, and quotes and brackets balance.
    """
    if not isinstance(grammar, str):
        raise pydantic_error("string_type", ("body", param, "grammar"), "Input should be a valid string", grammar)
    if not grammar.strip():
        raise bad("structured_outputs.grammar cannot be an empty string")
    if len(grammar) > MAX_SCHEMA_BYTES:
        raise bad(f"The grammar is longer than {MAX_SCHEMA_BYTES} characters.", param)
    lines = [ln for ln in grammar.splitlines() if ln.strip() and not ln.strip().startswith(("#", "//"))]
    if any(_RULE.match(ln) for ln in lines):
        defined: set[str] = set()
        used: set[str] = set()
        body = ""
        for ln in lines:
            m = _RULE.match(ln)
            if m:
                defined.add(m.group(1))
                body = m.group(2)
            elif body:
                body = ln
            else:
                raise bad("Invalid grammar specification.", param)
            used.update(r.group(1) for r in _REFERENCE.finditer(body) if r.group(1))
            if not _balanced(body):
                raise bad("Invalid grammar specification.", param)
        if "root" not in defined or used - defined:
            raise bad("Invalid grammar specification.", param)
        return grammar
    if lines and _LARK_RULE.match(lines[0]) and all(_balanced(ln) for ln in lines):
        return grammar
    raise bad("Invalid grammar specification.", param)


def _balanced(text: str) -> bool:
    depth = 0
    quoted = False
    escaped = False
    in_class = False
    for ch in text:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif quoted:
            quoted = ch != '"'
        elif in_class:
            in_class = ch != "]"
        elif ch == '"':
            quoted = True
        elif ch == "[":
            in_class = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0 and not quoted and not in_class
