"""How large a JSON schema is once its ``$ref``s are followed, and how small the smallest value it allows.

Both walks follow local references and stop at a reference already on the current path, so a
recursive schema costs what its text costs, and a schema that reuses one definition many times
(the JSON-schema "billion laughs") is measured by what a validator would actually walk.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ("REF_KEYS", "SchemaTooComplex", "SmallestSize", "resolve_ref", "unfolded_nodes")

REF_KEYS = ("$ref", "$dynamicRef", "$recursiveRef")
_DATA_KEYS = frozenset({"const", "enum", "default", "examples"})  # values, not subschemas


class SchemaTooComplex(ValueError):
    """The schema unfolds into more subschemas than the limit."""


def resolve_ref(root: Any, ref: str) -> Any:
    """Follow a local ``#/...`` JSON pointer; ``None`` when it points nowhere (or is not local)."""
    if not ref.startswith("#"):
        return None
    node: Any = root
    for part in [p for p in ref[1:].split("/") if p]:
        part = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node


def _refs(node: dict[str, Any]) -> list[str]:
    return [r for key in REF_KEYS if isinstance(r := node.get(key), str)]


def unfolded_nodes(root: Any, limit: int) -> int:
    """How many schema nodes a validator may walk: references expanded, cycles counted once.

    Iterative (no recursion limit to hit); raises ``SchemaTooComplex`` past ``limit``.
    """
    count = 0
    stack: list[tuple[Any, frozenset[int]]] = [(root, frozenset())]  # (node, ref targets on its path)
    while stack:
        node, path = stack.pop()
        if isinstance(node, list):
            stack.extend((item, path) for item in node)
            continue
        if not isinstance(node, dict):
            continue
        count += 1
        if count > limit:
            raise SchemaTooComplex(f"the schema unfolds into more than {limit} subschemas once its $refs are "
                                   "followed")
        for ref in _refs(node):
            target = resolve_ref(root, ref)
            if isinstance(target, (dict, list)) and id(target) not in path:
                stack.append((target, path | {id(target)}))
        stack.extend((v, path) for k, v in node.items() if k not in _DATA_KEYS and k not in REF_KEYS)
    return count


class SmallestSize:
    """Length, in characters of compact JSON, of the smallest value each subschema allows.

    ``math.inf`` means no finite value: ``false``, an empty ``enum``, or a ``$ref`` cycle that every
    value must go through (``{"$ref": "#"}``, a required property or a non-empty array of itself).
    The estimate follows what ``structured.minimal_instance`` builds; it needs no exactness, only
    the same finiteness and the same order of magnitude. Work is bounded by ``unfolded_nodes``.
    """

    def __init__(self, root: Any, cap: float = 2**62) -> None:
        self.root = root
        self.cap = cap
        self._memo: dict[int, float] = {}

    def of(self, node: Any, path: frozenset[int] = frozenset()) -> float:
        """The smallest size of ``node`` (a subschema of the root) reached through the ``$ref`` targets in ``path``.

        Those targets may not be entered again: a value that needs one inside itself is not finite.
        """
        size, _ = self._size(node, path)
        return size

    def _size(self, node: Any, path: frozenset[int]) -> tuple[float, bool]:
        """(size, whether a cycle was cut below), memoized when none was: a cut depends on the path."""
        if node is True or node == {}:
            return 4.0, False  # null
        if not isinstance(node, dict):
            return math.inf, False
        key = id(node)
        if key in self._memo:
            return self._memo[key], False
        size, cut = self._compute(node, path)
        if size != math.inf:
            size = min(size, self.cap)  # big but finite stays finite
        if not cut:
            self._memo[key] = size
        return size, cut

    def _compute(self, node: dict[str, Any], path: frozenset[int]) -> tuple[float, bool]:
        refs = _refs(node)
        if refs:
            target = resolve_ref(self.root, refs[0])
            if target is None or id(target) in path:
                return math.inf, True
            return self._size(target, path | {id(target)})
        if "const" in node:
            return float(len(json.dumps(node["const"]))), False
        if "enum" in node:
            values = node["enum"]
            return (min((float(len(json.dumps(v))) for v in values), default=math.inf)
                    if isinstance(values, list) else math.inf), False
        for key in ("anyOf", "oneOf"):
            parts = node.get(key)
            if isinstance(parts, list) and parts:
                results = [self._size(p, path) for p in parts]
                return min(s for s, _ in results), any(c for _, c in results)
        parts = node.get("allOf")
        if isinstance(parts, list) and parts:
            results = [self._size(p, path) for p in parts]
            return max(s for s, _ in results), any(c for _, c in results)
        return self._typed(node, path)

    def _typed(self, node: dict[str, Any], path: frozenset[int]) -> tuple[float, bool]:
        kind = _kind(node)
        if kind == "object":
            props = node.get("properties")
            props = props if isinstance(props, dict) else {}
            required = node.get("required")
            required = required if isinstance(required, list) else []
            total, cut = 2.0, False
            for name in required:
                size, c = self._size(props.get(name, {}) if isinstance(name, str) else {}, path)
                total += len(json.dumps(name)) + 2 + size
                cut = cut or c
            return total, cut
        if kind == "array":
            count = _int(node.get("minItems"))
            if count == 0:
                return 2.0, False
            size, cut = self._size(node.get("items", {}), path)
            return 2.0 + count * (size + 2), cut
        if kind == "string":
            return 2.0 + _int(node.get("minLength")), False
        if kind in ("integer", "number"):
            return float(len(str(node.get("minimum", 0)))) + 1, False
        return 5.0, False


def _kind(node: dict[str, Any]) -> str:
    kind = node.get("type", "object" if "properties" in node else "string")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "null")
    return kind if isinstance(kind, str) else "string"


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
