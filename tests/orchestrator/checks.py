"""Check functions that test jobs reference as ``tests.orchestrator.checks:NAME``."""

from __future__ import annotations

from typing import Any

from protocol.messages import Verdict


def is_even(output: Any, task: Any) -> bool:
    return isinstance(output, int) and output % 2 == 0


def short(output: Any, task: Any) -> tuple[bool, str]:
    ok = isinstance(output, str) and len(output) <= 10
    return ok, "" if ok else f"{len(str(output))} characters; keep it to 10"


async def async_verdict(output: Any, task: Any) -> Verdict:
    return Verdict(passed=output == "yes", feedback="say yes", corrections=("answer 'yes'",))


def explodes(output: Any, task: Any) -> bool:
    raise RuntimeError("check is broken")


def returns_nonsense(output: Any, task: Any) -> object:
    return object()


NOT_A_FUNCTION = 42
