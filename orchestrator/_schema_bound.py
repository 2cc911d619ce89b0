"""How many tokens the longest answer a bounded JSON schema allows can take, so ``max_tokens`` fits it.

A constrained decoder (vLLM's structured outputs, llama.cpp's grammars) keeps the answer inside
the schema's ``maxItems`` and ``maxLength``, so the longest valid answer is known in characters.
Tokens are counted at ``CHARS_PER_TOKEN`` characters each, plus two tokens for the whitespace a
model may put at each separator (newline and indentation). Measured with SmolLM2's tokenizer on
the longest plans, pretty-printed: English words run at about 4 characters a token, a word
repeated over and over (a small model's degenerate answer) at about 1.9, so 1.8 covers both; a
string of digits or punctuation runs at 1.2 to 1.7 and can still be cut off (the caller then
asks again, saying so). Full coverage would need one token per character, which would not fit a
small model's context. A schema with an unbounded string or array has no bound (``None``).
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ("CHARS_PER_TOKEN", "json_char_bound", "json_token_bound")

CHARS_PER_TOKEN = 1.8
_WHITESPACE_TOKENS = 2  # per separator: a newline and indentation, as pretty-printing models write them


def json_token_bound(schema: dict[str, Any]) -> int | None:
    """Tokens that suffice for any answer valid for ``schema``; None when the schema is unbounded."""
    bound = _bound(schema)
    if bound is None:
        return None
    chars, separators = bound
    return math.ceil(chars / CHARS_PER_TOKEN) + _WHITESPACE_TOKENS * separators + 8


def json_char_bound(schema: dict[str, Any]) -> int | None:
    """Characters of the longest compact JSON valid for ``schema``; None when unbounded."""
    bound = _bound(schema)
    return None if bound is None else bound[0]


def _bound(schema: dict[str, Any]) -> tuple[int, int] | None:
    """(characters, separators) of the longest compact answer, or None."""
    if "const" in schema:
        return len(json.dumps(schema["const"])), 0
    if "enum" in schema:
        return max(len(json.dumps(v)) for v in schema["enum"]), 0
    kind = schema.get("type")
    if kind == "boolean":
        return 5, 0
    if kind == "null":
        return 4, 0
    if kind == "integer" and "maximum" in schema and "minimum" in schema:
        return max(len(str(schema["maximum"])), len(str(schema["minimum"]))), 0
    if kind == "string":
        if "maxLength" not in schema:
            return None
        return 2 + int(schema["maxLength"]), 0  # quotes; escapes are rare in plain text and ignored
    if kind == "array":
        items = _bound(schema.get("items", {}))
        if items is None or "maxItems" not in schema:
            return None
        n = int(schema["maxItems"])
        return 2 + n * (items[0] + 1), n * (items[1] + 1) + 1
    if kind == "object":
        if schema.get("additionalProperties", True) is not False:
            return None  # a decoder may add properties of any length
        chars, separators = 2, 1
        for name, sub in schema.get("properties", {}).items():
            inner = _bound(sub)
            if inner is None:
                return None
            chars += len(json.dumps(name)) + 2 + inner[0]  # "name": value,
            separators += 2 + inner[1]
        return chars, separators
    return None
