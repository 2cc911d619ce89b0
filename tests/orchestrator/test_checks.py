"""``spec.check``: resolved when the job is loaded, and at verification time a failed verdict, never an exception."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator.api import Orchestrator
from orchestrator.job import Spec, load_job, parse_job
from orchestrator.records import TaskRecord
from orchestrator.verifier import check_spec
from protocol.errors import JobError
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
    ("nosuchmod:fn", "cannot load 'nosuchmod:fn': No module named 'nosuchmod'"),
    ("tests.orchestrator.checks:nosuchfn", "cannot load 'tests.orchestrator.checks:nosuchfn': module "
                                           "'tests.orchestrator.checks' has no attribute 'nosuchfn'"),
    ("tests.orchestrator.checks:NOT_A_FUNCTION", "cannot load 'tests.orchestrator.checks:NOT_A_FUNCTION': it is "
                                                 "a int, not a function"),
    ("tests.orchestrator.broken_check_module:fn", "importing it raised RuntimeError: this module is broken"),
])
def test_a_check_that_cannot_be_loaded_fails_the_job_naming_task_and_field(tmp_path: Path, check: str,
                                                                             why: str) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(f"goal: g\ntasks:\n  - {{id: ok, capability: echo}}\n"
                    f"  - {{id: x, capability: echo, spec: {{check: '{check}'}}}}\n")
    with pytest.raises(JobError) as caught:
        load_job(path)
    assert str(caught.value).startswith(f"{path}: task 'x': field 'spec.check': ")
    assert why in str(caught.value)
    assert (caught.value.task_id, caught.value.field) == ("x", "spec.check")


def test_a_loadable_check_passes_validation() -> None:
    job = parse_job(_job("tests.orchestrator.checks:is_even"))
    assert job.task("x").spec.check == "tests.orchestrator.checks:is_even"


def _task(check: str) -> TaskRecord:
    return TaskRecord(id="x", capability="echo", spec=Spec(check=check))


async def test_a_check_that_cannot_be_loaded_at_verification_is_a_failed_verdict_naming_it() -> None:
    # Built directly, not loaded: as a job validated before its check module went away.
    verdict = await check_spec(Spec(check="nosuchmod:fn"), 1, _task("nosuchmod:fn"))
    assert not verdict.passed
    assert verdict.verifier == "nosuchmod:fn"
    assert "nosuchmod:fn" in verdict.feedback
    assert "No module named 'nosuchmod'" in verdict.feedback


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
