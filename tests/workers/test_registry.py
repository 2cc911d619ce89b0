"""Loading worker plugins: entry points and module:Class references, with errors that name the plugin."""

from __future__ import annotations

from importlib.metadata import EntryPoint

import pytest

from protocol.errors import PluginLoadError
from workers import Worker
from workers.builtin.python import PythonWorker
from workers.registry import ENTRY_POINT_GROUP, available, load, load_entry_point


class NotAWorker:
    pass


class Named(Worker):
    capability = "named"

    async def handle(self, task: object) -> None:
        return None


def test_builtin_python_worker_is_registered() -> None:
    assert "python" in available()
    assert load("python") is PythonWorker


def test_module_class_reference_loads() -> None:
    assert load("tests.workers.test_registry:Named") is Named


@pytest.mark.parametrize(("spec", "message"), [
    ("no_such_plugin", "no worker plugin named 'no_such_plugin'"),
    ("no.such.module:Thing", "worker plugin 'no.such.module:Thing' failed to load: ModuleNotFoundError"),
    ("tests.workers.test_registry:Missing", "worker plugin 'tests.workers.test_registry:Missing' failed to load"),
    ("tests.workers.test_registry:NotAWorker", "not a subclass of workers.Worker"),
    ("justamodule:", "must look like 'package.module:Class'"),
])
def test_unloadable_plugins_fail_with_a_message_naming_them(spec: str, message: str) -> None:
    with pytest.raises(PluginLoadError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load(spec)


def test_entry_point_that_fails_to_import_names_the_plugin() -> None:
    ep = EntryPoint(name="broken", value="tests.workers.no_such_module:Worker", group=ENTRY_POINT_GROUP)
    with pytest.raises(PluginLoadError, match=r"worker plugin 'broken' \(tests.workers.no_such_module:Worker\) "
                                              r"failed to import: ModuleNotFoundError"):
        load_entry_point(ep)


def test_entry_point_name_must_match_the_capability() -> None:
    ep = EntryPoint(name="other", value="tests.workers.test_registry:Named", group=ENTRY_POINT_GROUP)
    with pytest.raises(PluginLoadError, match="declares capability 'named'"):
        load_entry_point(ep)


def test_worker_without_capability_is_refused_at_class_creation() -> None:
    with pytest.raises(TypeError, match="must set a string class attribute 'capability'"):
        class Nameless(Worker):
            async def handle(self, task: object) -> None:
                return None
