"""``spec.check``: resolved when the job is loaded, and at verification time a failed verdict, never an exception."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator import _checks
from orchestrator._checks import default_checks
from orchestrator.api import Orchestrator
from orchestrator.job import Spec, load_job, parse_job
from orchestrator.records import TaskRecord
from orchestrator.verifier import check_spec
from protocol.errors import ConfigError, JobError
from tests.orchestrator.checks import is_even
from workers import Task, Worker

pytestmark = pytest.mark.timeout(30)


class Echo(Worker):
    """Returns its input."""

    capability = "echo"

    async def handle(self, task: Task) -> Any:
        return task.input


def _job(check: str) -> dict[str, Any]:
    return {"goal": "g", "tasks": [{"id": "ok", "capability": "echo"},
                                   {"id": "x", "capability": "echo", "spec": {"check": check}}]}


@pytest.mark.parametrize(("check", "why"), [
    ("nosuchmod:fn", "cannot load check 'nosuchmod:fn': No module named 'nosuchmod'"),
    ("tests.orchestrator.checks:nosuchfn", "cannot load check 'tests.orchestrator.checks:nosuchfn': module "
                                           "'tests.orchestrator.checks' has no attribute 'nosuchfn'"),
    ("tests.orchestrator.checks:NOT_A_FUNCTION", "cannot load check 'tests.orchestrator.checks:NOT_A_FUNCTION': "
                                                 "it is a int, not a function"),
    ("tests.orchestrator.broken_check_module:fn", "importing it raised RuntimeError: this module is broken"),
])
def test_an_allowed_check_that_cannot_be_loaded_fails_the_job_naming_task_and_field(tmp_path: Path, check: str,
                                                                                     why: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(f"goal: g\ntasks:\n  - {{id: ok, capability: echo}}\n"
                    f"  - {{id: x, capability: echo, spec: {{check: '{check}'}}}}\n")
    with pytest.raises(JobError) as caught:
        load_job(path, checks=default_checks([check]))
    assert str(caught.value).startswith(f"{path}: task 'x': field 'spec.check': ")
    assert why in str(caught.value)
    assert (caught.value.task_id, caught.value.field) == ("x", "spec.check")


@pytest.mark.parametrize("check", ["os:system", "pty:spawn", "shutil:rmtree", "nosuchmod:fn", "is_sorted"])
def test_a_check_that_is_neither_registered_nor_allowed_fails_the_job(check: str) -> None:
    with pytest.raises(JobError) as caught:
        parse_job(_job(check), source="job.yaml")
    assert str(caught.value).startswith("job.yaml: task 'x': field 'spec.check': ")
    assert f"check {check!r} is not registered" in str(caught.value)
    assert "orchestrator.checks" in str(caught.value)


def test_a_refused_check_is_never_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "side_effect_check.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef fn(o, t): return True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(JobError, match="is not registered"):
        parse_job(_job("side_effect_check:fn"))
    assert not marker.exists()
    assert "side_effect_check" not in sys.modules


def test_a_check_registered_under_the_entry_point_group_is_found_by_name(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # What installing a plugin package does: a dist-info with an orchestrator.checks entry point.
    dist = tmp_path / "evenplugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: evenplugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[orchestrator.checks]\neven = tests.orchestrator.checks:is_even\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("ORCH_ALLOW_CHECKS")
    _checks._entry_points.cache_clear()
    try:
        job = parse_job(_job("even"))
        assert default_checks().resolve("even") is is_even
        assert "even" in default_checks().names()
    finally:
        monkeypatch.undo()
        _checks._entry_points.cache_clear()
    assert job.task("x").spec.check == "even"
    with pytest.raises(JobError, match="'even' is not registered"):
        parse_job(_job("even"))


async def test_checks_passed_in_process_run_by_name() -> None:
    async with Orchestrator(workers=[Echo], checks={"even": is_even}) as orch:
        with anyio.fail_after(10):
            odd = await orch.run({"goal": "g", "tasks": [{"id": "x", "capability": "echo", "input": 3,
                                                          "max_attempts": 1, "spec": {"check": "even"}}]})
            even = await orch.run({"goal": "g", "tasks": [{"id": "x", "capability": "echo", "input": 4,
                                                           "spec": {"check": "even"}}]})
    assert (odd.state, even.state) == ("failed", "accepted")
    assert odd.record.tasks["x"].reason.endswith("last feedback: check even failed")


def test_allowed_references_must_be_module_function() -> None:
    with pytest.raises(ConfigError, match=r"'os\.system' must be a module:function reference"):
        default_checks(["os.system"])


def test_a_loadable_check_passes_validation() -> None:
    job = parse_job(_job("tests.orchestrator.checks:is_even"))
    assert job.task("x").spec.check == "tests.orchestrator.checks:is_even"


def _task(check: str) -> TaskRecord:
    return TaskRecord(id="x", capability="echo", spec=Spec(check=check))


async def test_a_check_that_is_not_registered_at_verification_is_a_failed_verdict_naming_it() -> None:
    # Built directly, not loaded: as a job validated by a manager configured otherwise.
    verdict = await check_spec(Spec(check="nosuchmod:fn"), 1, _task("nosuchmod:fn"))
    assert not verdict.passed
    assert verdict.verifier == "nosuchmod:fn"
    assert "check nosuchmod:fn could not be run: check 'nosuchmod:fn' is not registered" in verdict.feedback


@pytest.mark.parametrize(("check", "feedback"), [
    ("tests.orchestrator.checks:explodes", "check tests.orchestrator.checks:explodes raised RuntimeError: "
                                           "check is broken"),
    ("tests.orchestrator.checks:returns_nonsense", "check tests.orchestrator.checks:returns_nonsense returned "
                                                   "object; it must return"),
])
async def test_a_check_that_raises_or_misbehaves_is_a_failed_verdict(check: str, feedback: str) -> None:
    verdict = await check_spec(Spec(check=check), 1, _task(check))
    assert not verdict.passed
    assert verdict.verifier == check
    assert feedback in verdict.feedback


async def test_a_raising_check_fails_the_task_with_its_error_and_the_run_ends() -> None:
    async with Orchestrator(workers=[Echo]) as orch:
        run = await orch.submit({"goal": "g", "tasks": [
            {"id": "x", "capability": "echo", "input": 1, "max_attempts": 1,
             "spec": {"check": "tests.orchestrator.checks:explodes"}}]})
        with anyio.fail_after(10):
            result = await run.wait()
    assert result.state == "failed"
    task = result.record.tasks["x"]
    assert task.state == "failed"
    assert "check tests.orchestrator.checks:explodes raised RuntimeError: check is broken" in task.reason
