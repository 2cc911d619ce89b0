"""Which check functions a job may name, and resolving a name to its function: the one place that does it.

A job file is data from whoever can write to the jobs stream, so a spec's ``check`` is a *name*, never
an import path the job chooses: importing ``pty:spawn`` or ``shutil:rmtree`` because a job said so ran
an attacker's code in the manager. A name resolves only to

- a check registered by an installed package under the entry point group ``orchestrator.checks``,
- a function passed in process (``Orchestrator(checks={"name": fn})``), or
- a ``module:function`` the operator allowed (``--allow-check``, ``ORCH_ALLOW_CHECKS``, ``allow_checks=``).

Anything else is refused before any import. A job is checked when it is loaded
(``orchestrator.job.parse_job``) and the verifier resolves the same way when it runs the check, so the
two can never disagree about what a name means.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from types import MappingProxyType
from typing import Any

from protocol.errors import ConfigError

__all__ = ("ALLOW_CHECKS_ENV", "CHECKS_GROUP", "CheckRegistry", "default_checks")

CHECKS_GROUP = "orchestrator.checks"
ALLOW_CHECKS_ENV = "ORCH_ALLOW_CHECKS"  # comma-separated ``module:function`` references


@dataclass(frozen=True, slots=True)
class CheckRegistry:
    """The checks a manager will run: installed entry points, in-process functions, allowed references."""

    functions: Mapping[str, Callable[..., Any]] = field(default_factory=lambda: MappingProxyType({}))
    allowed: frozenset[str] = frozenset()

    def resolve(self, name: str) -> Callable[..., Any]:
        """The function ``name`` stands for; ConfigError saying why when it is not allowed or cannot load.

        Nothing is imported for a name that is neither registered nor allowed.
        """
        if name in self.functions:
            return self.functions[name]
        entry = _entry_points().get(name)
        if entry is not None:
            return _load_entry_point(entry)
        if name in self.allowed:
            return _import(name)
        raise ConfigError(f"check {name!r} is not registered: a job names a check registered under the entry "
                          f"point group {CHECKS_GROUP!r} (or allowed with --allow-check / {ALLOW_CHECKS_ENV}); "
                          "job files cannot import code")

    def names(self) -> list[str]:
        """Every name a job may use, sorted."""
        return sorted({*self.functions, *_entry_points(), *self.allowed})

    def with_(self, functions: Mapping[str, Callable[..., Any]] | None = None,
              allowed: Iterable[str] = ()) -> CheckRegistry:
        """This registry plus more in-process functions and allowed references."""
        return CheckRegistry(MappingProxyType({**self.functions, **(functions or {})}),
                             self.allowed | _references(allowed))


def default_checks(allowed: Iterable[str] = ()) -> CheckRegistry:
    """Installed checks, plus the references in ``ORCH_ALLOW_CHECKS`` and ``allowed``."""
    from_env = [r for r in os.environ.get(ALLOW_CHECKS_ENV, "").split(",") if r.strip()]
    return CheckRegistry(allowed=_references([*from_env, *allowed]))


def _references(refs: Iterable[str]) -> frozenset[str]:
    out = set()
    for ref in refs:
        ref = ref.strip()
        module, sep, attr = ref.partition(":")
        if not (sep and module and attr) or not all(p.isidentifier() for p in [*module.split("."),
                                                                                 *attr.split(".")]):
            raise ConfigError(f"allowed check {ref!r} must be a module:function reference")
        out.add(ref)
    return frozenset(out)


@cache  # scanning installed metadata costs milliseconds; a new plugin needs a restart anyway
def _entry_points() -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=CHECKS_GROUP)}


@cache
def _load_entry_point(entry: EntryPoint) -> Callable[..., Any]:
    return _callable(entry.name, lambda: entry.load())


@cache
def _import(ref: str) -> Callable[..., Any]:
    """Import an allowed ``module:function``."""
    def load() -> Any:
        module_name, _, attr = ref.partition(":")
        obj: Any = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj

    return _callable(ref, load)


def _callable(name: str, load: Callable[[], Any]) -> Callable[..., Any]:
    try:
        obj = load()
    except (ImportError, AttributeError) as exc:  # the message says it all: "No module named 'x'"
        raise ConfigError(f"cannot load check {name!r}: {exc}") from exc
    except Exception as exc:  # the module itself failed while importing: say how
        raise ConfigError(f"cannot load check {name!r}: importing it raised {type(exc).__name__}: {exc}") from exc
    if not callable(obj):
        raise ConfigError(f"cannot load check {name!r}: it is a {type(obj).__name__}, not a function")
    return obj  # type: ignore[no-any-return]
