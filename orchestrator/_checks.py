"""Resolving a spec's ``check`` reference to the function it names: the one place that does it.

A job is checked when it is loaded (``orchestrator.job.parse_job``) and the verifier calls the
same function when it runs the check, so the two can never disagree about what a name means.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from functools import cache
from typing import Any

from protocol.errors import ConfigError

__all__ = ("load_check",)


@cache
def load_check(ref: str) -> Callable[..., Any]:
    """Import a ``module:function`` check; ConfigError saying why when it cannot be loaded."""
    module_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:  # the message says it all: "No module named 'x'"
        raise ConfigError(f"cannot load {ref!r}: {exc}") from exc
    except Exception as exc:  # the module itself failed while importing: say how
        raise ConfigError(f"cannot load {ref!r}: importing it raised {type(exc).__name__}: {exc}") from exc
    if not callable(obj):
        raise ConfigError(f"cannot load {ref!r}: it is a {type(obj).__name__}, not a function")
    return obj  # type: ignore[no-any-return]
