"""``spec.schema`` is checked against the JSON Schema metaschema when a job is loaded: once per distinct schema."""

from __future__ import annotations

from typing import Any

import pytest

from orchestrator import job as job_module
from orchestrator.job import parse_job
from protocol.errors import JobError


def _job(*schemas: Any) -> dict[str, Any]:
    return {"goal": "g", "tasks": [{"id": f"t{i}", "capability": "echo", "spec": {"schema": schema}}
                                   for i, schema in enumerate(schemas)]}


def test_an_invalid_schema_fails_the_job_naming_the_task_every_time() -> None:
    bad = {"type": "string", "maxLength": "ten"}
    for _ in range(2):  # the second load must not find it remembered as valid
        with pytest.raises(JobError) as caught:
            parse_job(_job({"type": "string"}, bad))
        assert "t1" in str(caught.value), caught.value
        assert "not a valid JSON schema" in str(caught.value), caught.value


def test_thousands_of_tasks_with_one_schema_check_it_once() -> None:
    schema = {"type": "object", "required": ["answer"], "properties": {"answer": {"type": "string", "minLength": 7}}}
    before = job_module._check_schema_text.cache_info()
    parse_job(_job(*[schema] * 2000))
    after = job_module._check_schema_text.cache_info()
    assert after.misses - before.misses <= 1
    assert after.hits - before.hits >= 1999


def test_a_schema_that_is_not_plain_json_is_still_checked() -> None:
    # {1: ...} and {"1": ...} dump to the same JSON; the first is checked as it is, not by the second's verdict
    parse_job(_job({"type": "object", "properties": {"1": {"type": "string"}}}))
    parse_job(_job({"type": "object", "properties": {1: {"type": "string"}}}))
    with pytest.raises(JobError, match="not a valid JSON schema"):
        parse_job(_job({"type": "object", "properties": {1: {"type": 5}}}))
