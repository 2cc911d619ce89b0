"""Checks this plugin registers under the entry point group ``orchestrator.checks`` (see pyproject.toml).

A job names one as ``spec: {check: slugify.is_slug}``; it never imports it by path.
"""

from __future__ import annotations

import re
from typing import Any

_SLUG = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def is_slug(output: Any, task: Any) -> tuple[bool, str]:
    """Lowercase ASCII words joined by single hyphens."""
    ok = isinstance(output, str) and _SLUG.fullmatch(output) is not None
    return ok, "" if ok else f"{output!r} is not a slug: lowercase ASCII words joined by single hyphens"
