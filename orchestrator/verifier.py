"""The programmatic checks of a spec: expect, schema and check functions, cheapest first."""

from __future__ import annotations

import inspect
import json
from typing import Any

import jsonschema

from orchestrator._checks import CheckRegistry, default_checks
from orchestrator.job import Spec
from orchestrator.records import TaskRecord
from protocol.errors import ConfigError
from protocol.messages import Verdict

__all__ = ("check_spec", "data_checks", "run_check")

_MAX_SHOWN = 300


async def check_spec(spec: Spec, output: Any, task: TaskRecord, checks: CheckRegistry | None = None) -> Verdict:
    """Run the spec's programmatic checks; the first failure decides, with feedback saying what to change."""
    failed = data_checks(spec, output)
    if failed is not None:
        return failed
    if spec.check:
        return await run_check(spec.check, output, task, checks)
    return Verdict(passed=True, verifier="spec")


def data_checks(spec: Spec, output: Any) -> Verdict | None:
    """The checks a spec states as data (``expect``, ``schema``): the failing verdict, or None when they pass.

    Pure and synchronous, so the run engine applies them itself; only ``check`` functions (user code) run
    in the manager's shell.
    """
    if spec.has_expect and output != spec.expect:
        return Verdict(passed=False, verifier="expect",
                       feedback=f"expected {_show(spec.expect)}, got {_show(output)}",
                       corrections=(f"return exactly {_show(spec.expect)}",))
    if spec.schema_ is not None:
        errors = sorted(jsonschema.Draft202012Validator(spec.schema_).iter_errors(output), key=lambda e: e.path)
        if errors:
            first = errors[0]
            where = "/".join(str(p) for p in first.absolute_path) or "the output"
            return Verdict(passed=False, verifier="schema", feedback=f"schema check failed at {where}: {first.message}",
                           corrections=tuple(f"{'/'.join(map(str, e.absolute_path)) or 'output'}: {e.message}"
                                             for e in errors[:5]))
    return None


async def run_check(ref: str, output: Any, task: TaskRecord, checks: CheckRegistry | None = None) -> Verdict:
    """Run one check function; whatever goes wrong is a failed verdict naming the check, never an exception.

    Jobs are checked when they are loaded, so a check that cannot be resolved here was removed, broken or
    disallowed since (or the run was resumed by a manager configured otherwise); failing the attempt keeps
    the task moving (a redo, then ``failed`` when attempts run out). Nothing unregistered is imported.
    """
    try:
        fn = (checks or default_checks()).resolve(ref)
    except ConfigError as exc:
        return Verdict(passed=False, verifier=ref, feedback=f"check {ref} could not be run: {exc}")
    try:
        result = fn(output, task)
        if inspect.isawaitable(result):
            result = await result
        return _as_verdict(result, ref)
    except Exception as exc:  # the check's own bug is the attempt's failure, with the error as feedback
        return Verdict(passed=False, verifier=ref, feedback=f"check {ref} raised {type(exc).__name__}: {exc}")


def _as_verdict(result: Any, ref: str) -> Verdict:
    if isinstance(result, Verdict):
        return result if result.verifier else result.model_copy(update={"verifier": ref})
    if isinstance(result, bool):
        return Verdict(passed=result, verifier=ref, feedback="" if result else f"check {ref} failed")
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], bool):
        return Verdict(passed=result[0], verifier=ref, feedback=str(result[1]))
    return Verdict(passed=False, verifier=ref,
                   feedback=f"check {ref} returned {type(result).__name__}; it must return a bool, "
                            "a (passed, feedback) pair or a Verdict")


def _show(value: Any) -> str:
    try:
        text = json.dumps(value, ensure_ascii=False, default=repr)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."
