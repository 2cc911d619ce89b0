"""Prompt layout for vLLM's prefix cache: byte-stable parts first, the part that varies last.

vLLM caches KV in 16-token blocks chained from the first token, so two prompts share cached
work only up to their first differing byte. Keep the system prompt, role, tools and spec
identical across calls (no timestamps or ids there) and append history; put the new input last.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ("build_messages", "stable_json")


def stable_json(value: Any) -> str:
    """Serialize ``value`` the same way every time (sorted keys, fixed separators)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def build_messages(
    *,
    system: str,
    variable: str,
    role: str | None = None,
    tools: Sequence[Mapping[str, Any]] | None = None,
    spec: str | Mapping[str, Any] | None = None,
    context: str | None = None,
    history: Sequence[Mapping[str, Any]] = (),
) -> list[dict[str, Any]]:
    """Chat messages laid out most-shared first.

    Args:
        system: the global preamble, byte-identical across agents.
        variable: the newest input (instruction, feedback, answer to check); always last.
        role: the agent's role text, e.g. a marker from ``protocol.roles`` plus a persona.
        tools: tool definitions, serialized with sorted keys so their bytes never change.
        spec: the task spec shared by every attempt at a task (and by its verifier).
        context: shared documents, same order and bytes for every caller.
        history: earlier turns, append-only (rewriting them invalidates the cache after the edit).
    """
    parts = [system.strip()]
    if role:
        parts.append(role.strip())
    if tools:
        parts.append("Tools:\n" + stable_json(list(tools)))
    if spec is not None:
        parts.append("Spec:\n" + (spec.strip() if isinstance(spec, str) else stable_json(spec)))
    if context:
        parts.append("Context:\n" + context.strip())
    messages: list[dict[str, Any]] = [{"role": "system", "content": "\n\n".join(parts)}]
    messages.extend(dict(m) for m in history)
    messages.append({"role": "user", "content": variable})
    return messages
