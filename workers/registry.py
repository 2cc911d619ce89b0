"""Find worker classes: from the ``orchestrator.workers`` entry point group or ``module:Class`` strings."""

from __future__ import annotations

import importlib
from importlib.metadata import EntryPoint, entry_points

from protocol.errors import PluginLoadError
from workers.base import Worker

__all__ = ("ENTRY_POINT_GROUP", "available", "load", "load_entry_point", "load_reference")

ENTRY_POINT_GROUP = "orchestrator.workers"


def available() -> dict[str, EntryPoint]:
    """Installed worker plugins by capability name (not imported yet)."""
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load(spec: str) -> type[Worker]:
    """Load a plugin by entry point name (``python``) or by reference (``package.module:Class``)."""
    if ":" in spec:
        return load_reference(spec)
    plugins = available()
    if spec not in plugins:
        known = ", ".join(sorted(plugins)) or "none"
        raise PluginLoadError(f"no worker plugin named {spec!r} in entry point group {ENTRY_POINT_GROUP!r} "
                              f"(installed: {known})")
    return load_entry_point(plugins[spec])


def load_entry_point(ep: EntryPoint) -> type[Worker]:
    """Import an entry point and check it is a Worker serving the capability it is registered as."""
    try:
        obj = ep.load()
    except Exception as exc:  # a plugin can fail to import in any way; name it and keep the cause
        raise PluginLoadError(f"worker plugin {ep.name!r} ({ep.value}) failed to import: "
                              f"{type(exc).__name__}: {exc}") from exc
    cls = _check(obj, f"{ep.name!r} ({ep.value})")
    if cls.capability != ep.name:
        raise PluginLoadError(f"worker plugin {ep.name!r} ({ep.value}) declares capability {cls.capability!r}; "
                              "an entry point's name must be its capability")
    return cls


def load_reference(ref: str) -> type[Worker]:
    """Import ``package.module:Class``."""
    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise PluginLoadError(f"worker plugin reference {ref!r} must look like 'package.module:Class'")
    try:
        obj: object = importlib.import_module(module_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as exc:  # same reason as above
        raise PluginLoadError(f"worker plugin {ref!r} failed to load: {type(exc).__name__}: {exc}") from exc
    return _check(obj, repr(ref))


def _check(obj: object, label: str) -> type[Worker]:
    if not (isinstance(obj, type) and issubclass(obj, Worker)):
        raise PluginLoadError(f"worker plugin {label} is {obj!r}, not a subclass of workers.Worker")
    return obj
