"""Every package names its public API in an ``__all__`` tuple, and every name there exists."""

from __future__ import annotations

import importlib

import pytest


@pytest.mark.parametrize("package", ["protocol", "workers", "orchestrator"])
def test_package_all_names_exist(package: str) -> None:
    module = importlib.import_module(package)
    if not hasattr(module, "__all__"):
        pytest.skip(f"{package}/__init__.py defines no __all__ yet")
    names = module.__all__
    assert isinstance(names, tuple), f"{package}.__all__ should be a tuple, got {type(names).__name__}"
    assert names, f"{package}.__all__ is empty"
    assert all(isinstance(n, str) for n in names)
    assert len(set(names)) == len(names), f"{package}.__all__ has duplicates"
    missing = [n for n in names if not hasattr(module, n)]
    assert not missing, f"{package}.__all__ names missing attributes: {missing}"


def test_star_import_of_protocol_and_workers() -> None:
    for package in ("protocol", "workers"):
        namespace: dict[str, object] = {}
        exec(f"from {package} import *", namespace)
        assert set(importlib.import_module(package).__all__) <= set(namespace)


def test_worker_importable_from_workers() -> None:
    from workers import Worker
    from workers.base import Worker as BaseWorker

    assert Worker is BaseWorker


def test_user_facing_errors_are_importable_from_orchestrator() -> None:
    import orchestrator
    from orchestrator import ConfigError, JobError, ManifestError, OrchestratorError, PlanError
    from protocol import errors

    assert JobError is errors.JobError
    assert issubclass(JobError, ConfigError)
    assert issubclass(ManifestError, ConfigError)
    assert issubclass(PlanError, OrchestratorError)
    exported = {n for n in orchestrator.__all__ if isinstance(getattr(orchestrator, n), type)
                and issubclass(getattr(orchestrator, n), BaseException)}
    assert {"OrchestratorError", "ConfigError", "JobError", "ManifestError", "PluginLoadError", "PlanError",
            "BusUnavailable", "InferenceError", "NoActiveManager", "UnknownRun"} <= exported
    with pytest.raises(JobError, match="duplicate task id"):  # what a user catches, raised where users meet it
        orchestrator.parse_job({"goal": "g", "tasks": [{"id": "a", "capability": "python"},
                                                       {"id": "a", "capability": "python"}]})
