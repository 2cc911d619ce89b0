"""The console's server without a browser: an in-process run (as ``run --ui`` serves it), over HTTP.

Security checks live here too, since they must hold whatever the page does: read-only without a
session, the CSRF token and origin on actions, the CSP on every response, hostile text kept as data.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import pytest

from orchestrator.api import Orchestrator
from protocol.errors import ConfigError
from workers.builtin.python import PythonWorker

pytest.importorskip("starlette", reason="the console needs starlette: pip install 'orchestrator[ui]'")

from orchestrator.ui import Operators, RunSource, console_app  # needs starlette, checked above

HOSTILE = "<img src=x onerror=alert(1)></pre><script>alert(2)</script>"

JOB: dict[str, Any] = {"goal": "console test", "tasks": [
    {"id": "gated", "capability": "python", "spec": {"approval": "human"},
     "instruction": f"result = 'revised: ' + feedback[-1] if feedback else {HOSTILE!r}"},
]}


def in_process() -> Orchestrator:
    """An in-process orchestrator with the Python worker: what ``orchestrator run --ui`` serves."""
    return Orchestrator(workers=[PythonWorker])


def client(orch: Orchestrator, operators: Operators | None = None) -> httpx.AsyncClient:
    app = console_app(RunSource(orch.bus, orch.store.run_ids), operators, keepalive_s=0.2)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://console.test")


async def waiting_for_person(http: httpx.AsyncClient, run_id: str, attempt: int = 1) -> dict[str, Any]:
    with anyio.fail_after(20):
        while True:
            response = await http.get(f"/api/runs/{run_id}")
            if response.status_code == 404:  # submitted, not yet under way: its first summary is on its way
                await anyio.sleep(0.05)
                continue
            task: dict[str, Any] = response.json()["run"]["tasks"][0]
            if task["waiting"] and task["waiting"]["for"] == "person" and task["attempt"] >= attempt:
                return task
            await anyio.sleep(0.05)


async def login(http: httpx.AsyncClient, operators: Operators) -> str:
    """Log in as the first operator; returns the session's CSRF token."""
    response = await http.get(f"/login?token={operators.all()[0].token}")
    assert response.status_code == 303
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie
    assert "samesite=strict" in cookie
    me = (await http.get("/api/me")).json()
    assert me["operator"] == operators.all()[0].identity
    return str(me["csrf"])


def act(http: httpx.AsyncClient, run_id: str, body: dict[str, Any], csrf: str | None = None,
        **headers: str) -> Any:
    if csrf is not None:
        headers["X-CSRF-Token"] = csrf
    return http.post(f"/api/runs/{run_id}/actions", json=body, headers=headers)


async def test_every_response_carries_a_strict_csp_and_the_page_has_no_inline_code() -> None:
    async with in_process() as orch, client(orch) as http:
        for path in ("/", "/static/console.js", "/api/runs", "/api/runs/nope", "/login?token=x"):
            response = await http.get(path)
            csp = response.headers["content-security-policy"]
            assert "default-src 'none'" in csp, path
            assert "script-src 'self'" in csp, path
            assert response.headers["x-content-type-options"] == "nosniff"
            assert response.headers["referrer-policy"] == "no-referrer"
        page = (await http.get("/")).text
        for inline in ("<script>", "onclick", "style="):
            assert inline not in page
        js = (await http.get("/static/console.js")).text
        for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "eval(", "document.write"):
            assert sink not in js


async def test_a_run_is_listed_and_its_page_keeps_a_workers_markup_as_data() -> None:
    async with in_process() as orch, client(orch) as http:
        run = await orch.submit(JOB)
        task = await waiting_for_person(http, run.run_id)
        assert task["attempts"][0]["output"] == HOSTILE  # JSON data: the page sets it with textContent
        assert task["actions"] == ["approve", "reject", "redo", "accept", "cancel"]
        runs = (await http.get("/api/runs")).json()["runs"]
        assert [(r["run_id"], r["state"], r["goal"]) for r in runs] == [(run.run_id, "running", "console test")]
        assert runs[0]["started"] is not None
        assert (await http.get("/api/runs/unknown-run")).status_code == 404


async def test_without_a_session_every_action_is_refused_and_nothing_is_sent() -> None:
    operators = Operators.named(["alice"])
    async with in_process() as orch, client(orch, operators) as http:
        run = await orch.submit(JOB)
        await waiting_for_person(http, run.run_id)
        assert (await http.get("/api/me")).json()["operator"] is None
        approve = {"action": "approve", "task_id": "gated"}
        assert (await act(http, run.run_id, approve)).status_code == 403
        assert (await http.get("/login?token=not-the-token")).status_code == 403
        csrf = await login(http, operators)
        no_csrf = await act(http, run.run_id, approve)
        assert no_csrf.status_code == 403
        assert "CSRF" in no_csrf.json()["error"]
        assert (await act(http, run.run_id, approve, "wrong")).status_code == 403
        assert (await act(http, run.run_id, approve, csrf, Origin="http://evil.test")).status_code == 403
        await anyio.sleep(0.3)
        assert orch.manager.snapshot(run.run_id).tasks["gated"].state == "verify_done"  # still waiting


async def test_bad_action_requests_are_refused_with_the_reason() -> None:
    operators = Operators.named(["alice"])
    async with in_process() as orch, client(orch, operators) as http:
        run = await orch.submit(JOB)
        await waiting_for_person(http, run.run_id)
        csrf = await login(http, operators)
        cases = [({"action": "delete", "task_id": "gated"}, 400, "action must be one of"),
                 ({"action": "reject", "task_id": "gated"}, 400, "reject needs feedback"),
                 ({"action": "approve"}, 400, "needs a task_id"),
                 ({"action": "approve", "task_id": "nope"}, 409, "has no task 'nope'"),
                 ({"action": "redo", "task_id": "gated", "feedback": "x" * 20_001}, 400, "at most")]
        for body, code, words in cases:
            response = await act(http, run.run_id, body, csrf)
            assert (response.status_code, words in response.json()["error"]) == (code, True), body
        assert (await act(http, "nope", {"action": "cancel"}, csrf)).status_code == 404
        not_json = await http.post(f"/api/runs/{run.run_id}/actions", content=b"approve",
                                   headers={"X-CSRF-Token": csrf})
        assert not_json.status_code == 400
        too_deep = await http.post(f"/api/runs/{run.run_id}/actions", content=b"[" * 60_000,  # past json's recursion
                                   headers={"X-CSRF-Token": csrf})
        assert too_deep.status_code == 400


async def test_reject_then_approve_as_an_operator_ends_the_run_accepted_and_records_who() -> None:
    operators = Operators.named(["alice"])
    async with in_process() as orch, client(orch, operators) as http:
        run = await orch.submit(JOB)
        await waiting_for_person(http, run.run_id)
        csrf = await login(http, operators)
        sent = await act(http, run.run_id, {"action": "reject", "task_id": "gated", "feedback": "say hello"}, csrf)
        assert sent.status_code == 202, sent.text
        assert sent.json()["by"] == "operator:alice"
        task = await waiting_for_person(http, run.run_id, attempt=2)
        assert task["attempts"][-1]["output"] == "revised: say hello"
        decision = task["attempts"][0]["decisions"][0]
        assert (decision["action"], decision["by"], decision["feedback"]) == ("reject", "operator:alice", "say hello")
        assert (await act(http, run.run_id, {"action": "approve", "task_id": "gated"}, csrf)).status_code == 202
        result = await run.wait()
    assert result.accepted
    assert result.outputs == {"gated": "revised: say hello"}


async def test_the_event_stream_sends_the_history_then_the_run_until_it_ends() -> None:
    operators = Operators.named(["alice"])
    seen: list[tuple[str, Any]] = []
    async with in_process() as orch, client(orch, operators) as http:
        run = await orch.submit(JOB)
        await waiting_for_person(http, run.run_id)
        csrf = await login(http, operators)

        async def approve_while_streaming() -> None:
            await anyio.sleep(0.3)
            await act(http, run.run_id, {"action": "approve", "task_id": "gated"}, csrf)

        # httpx's ASGI transport hands the body over once the app returns: approve first, read after
        with anyio.fail_after(20):
            async with anyio.create_task_group() as tg:
                tg.start_soon(approve_while_streaming)
                async with http.stream("GET", f"/api/runs/{run.run_id}/stream") as s:
                    assert s.headers["content-type"].startswith("text/event-stream")
                    kind = ""
                    async for line in s.aiter_lines():
                        if line.startswith("event: "):
                            kind = line[7:]
                        elif line.startswith("data: "):
                            seen.append((kind, json.loads(line[6:])))
    assert seen[0][0] == "history"
    assert seen[-1] == ("end", {"state": "accepted"})
    history = [e for k, batch in seen if k == "history" for e in batch]
    assert [e["seq"] for e in history] == list(range(1, len(history) + 1))  # complete, in order, once each
    assert any(e["body"]["kind"] == "override" and e["actor"] == "operator:alice" for e in history)
    last_run = [d for k, d in seen if k == "run"][-1]
    assert (last_run["state"], last_run["tasks"][0]["actions"]) == ("accepted", [])


def test_operator_names_a_key_could_not_have_are_refused() -> None:
    with pytest.raises(ConfigError, match="operator name 'a b'"):
        Operators.named(["a b"])
    with pytest.raises(ConfigError, match="given twice"):
        Operators.named(["alice", "operator:alice"])


async def test_a_console_on_loopback_answers_only_to_loopback_names() -> None:
    from orchestrator.ui.server import LOOPBACK_NAMES

    async with in_process() as orch:
        app = console_app(RunSource(orch.bus, orch.store.run_ids), allowed_hosts=LOOPBACK_NAMES)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1:8080") as http:
            assert (await http.get("/api/runs")).status_code == 200
            assert (await http.get("/api/runs", headers={"Host": "localhost:8080"})).status_code == 200
            rebound = await http.get("/api/runs", headers={"Host": "attacker.example:8080"})  # DNS rebinding
            assert rebound.status_code == 400
            assert "content-security-policy" in rebound.headers
