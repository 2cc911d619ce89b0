"""The console in real Chromium, against a real cluster: live updates, approve, reject, and a read-only visitor.

``UPDATE_SCREENSHOT=1`` saves docs/console.png from the approve test (the screenshot in docs/console.md).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml

from orchestrator import processes
from protocol.history import OverrideGiven, Transitioned
from protocol.states import TaskEvent
from tests.integration.harness import ROOT
from tests.ui.conftest import Console

pytestmark = [pytest.mark.redis, pytest.mark.slow, pytest.mark.timeout(120)]

GATED = {"capability": "python", "spec": {"approval": "human"},
         "instruction": "result = 'revised: ' + feedback[-1] if feedback else 'first draft'"}
WAIT_MS = 30_000
HOSTILE = 'a draft with <img src=x onerror="window.__pwned=1"><b>markup</b>'  # a worker's output is data


async def submitted(console: Console, name: str, tasks: list[dict[str, Any]], goal: str = "") -> str:
    """Submit a job and wait until the manager has taken it (its history exists)."""
    cluster = console.cluster
    path = cluster.tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"goal": goal or f"console test {name}", "tasks": tasks}, sort_keys=False))
    run_id = await cluster.submit(path)
    with anyio.fail_after(20):
        while await cluster.status(run_id) is None:
            await anyio.sleep(0.1)
    return run_id


async def history(console: Console, run_id: str) -> list[Any]:
    async with console.cluster.bus() as bus:
        return await processes.read_events(bus, run_id)


async def operator_page(browser: Any, console: Console, **context: Any) -> Any:
    page = await (await browser.new_context(**context)).new_page()
    await page.goto(console.login_url)  # sets the session cookie, then lands on the run list
    await page.wait_for_selector("#who >> text=acting as operator:alice")
    return page


async def test_the_task_tree_updates_live_without_a_reload(console: Console, browser: Any) -> None:
    run_id = await submitted(console, "live", [
        {"id": "slow", "capability": "python", "instruction": "import time\ntime.sleep(3)\nresult = 'slept'"},
        {"id": "after", "capability": "python", "depends_on": ["slow"], "instruction": "result = deps['slow'] + '!'"},
    ])
    page = await (await browser.new_context()).new_page()
    errors: list[str] = []  # a CSP violation or a script error shows up here
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(f"{console.url}/#/")
    await page.wait_for_selector(f'tr[data-run="{run_id}"] >> text=console test live', timeout=WAIT_MS)
    await page.click(f'tr[data-run="{run_id}"] a')
    await page.wait_for_selector('li[data-task="slow"][data-state="not_done"]', timeout=WAIT_MS)
    await page.wait_for_selector('li[data-task="after"][data-state="not_done"]')
    await page.evaluate("window.__sameDocument = true")  # gone if anything reloaded the page
    await page.wait_for_selector('li[data-task="after"][data-state="accepted"]', timeout=WAIT_MS)
    await page.wait_for_selector("#run-state >> text=accepted", timeout=WAIT_MS)
    assert await page.evaluate("window.__sameDocument === true")
    assert await page.locator('#history li[data-kind="run_finished"]').count() == 1
    assert "d1" in (await page.locator('li[data-task="after"]').get_attribute("class") or "")
    assert errors == []


async def test_a_human_gated_task_is_approved_from_the_page_and_the_run_ends_accepted(console: Console,
                                                                                      browser: Any) -> None:
    run_id = await submitted(console, "approve", [
        {"id": "draft", "capability": "python", "instruction": f"result = {HOSTILE!r}"},
        {"id": "review", "depends_on": ["draft"], **GATED},
    ], goal="Draft the release note, then have a person review it")
    page = await operator_page(browser, console, viewport={"width": 1280, "height": 800})
    await page.goto(f"{console.url}/#/run/{run_id}")
    approve = page.locator('li[data-task="review"] button[data-action="approve"]')
    await approve.wait_for(timeout=WAIT_MS)
    await page.locator('li[data-task="review"] summary .id').click()  # open it: the attempt's output
    await page.wait_for_selector('li[data-task="review"] pre.output >> text=first draft')
    await page.locator('li[data-task="draft"] summary .id').click()
    shown = page.locator('li[data-task="draft"] pre.output')
    assert await shown.text_content() == HOSTILE  # shown as text ...
    assert await page.locator('li[data-task="draft"] pre.output *').count() == 0  # ... never as markup
    assert await page.evaluate("window.__pwned === undefined")
    await page.locator('li[data-task="draft"] summary .id').click()  # closed again for the screenshot
    if os.environ.get("UPDATE_SCREENSHOT") == "1":
        await page.screenshot(path=str(Path(ROOT) / "docs" / "console.png"))
    await approve.click()
    await page.click('#action-send[data-send="approve"]')
    await page.wait_for_selector("#run-state >> text=accepted", timeout=WAIT_MS)
    final = await console.cluster.wait(run_id, timeout=30)
    assert final["state"] == "accepted"
    overrides = [(e.actor, e.body.action) for e in await history(console, run_id) if isinstance(e.body, OverrideGiven)]
    assert overrides == [("operator:alice", "approve")]


async def test_a_reject_with_feedback_causes_a_new_attempt_that_carries_it(console: Console, browser: Any) -> None:
    run_id = await submitted(console, "reject", [{"id": "reject_me", **GATED}])
    page = await operator_page(browser, console)
    await page.goto(f"{console.url}/#/run/{run_id}")
    await page.locator('li[data-task="reject_me"] button[data-action="reject"]').click(timeout=WAIT_MS)
    await page.fill("#feedback", "add a greeting")
    await page.click('#action-send[data-send="reject"]')
    await page.wait_for_selector('li[data-task="reject_me"] [data-attempt="2"] pre.output >> text=revised: add a greeting',
                                 state="attached", timeout=WAIT_MS)
    events = await history(console, run_id)
    reject = next(e for e in events if isinstance(e.body, OverrideGiven))
    assert (reject.actor, reject.body.action, reject.body.feedback, reject.attempt) == (
        "operator:alice", "reject", "add a greeting", 1)
    done = [e.body.output for e in events
            if isinstance(e.body, Transitioned) and e.body.event is TaskEvent.DONE and e.attempt == 2]
    assert done == ["revised: add a greeting"]  # the worker's second attempt saw the feedback


async def test_a_read_only_visitor_has_no_buttons_and_a_forged_request_is_refused(console: Console,
                                                                                   browser: Any) -> None:
    run_id = await submitted(console, "readonly", [{"id": "gated", **GATED}])
    page = await (await browser.new_context(viewport={"width": 390, "height": 844})).new_page()  # a phone
    await page.goto(f"{console.url}/#/run/{run_id}")
    await page.wait_for_selector('li[data-task="gated"][data-state="verify_done"]', timeout=WAIT_MS)
    await page.wait_for_selector('li[data-task="gated"] .wait >> text=waiting for a person')
    assert await page.locator("button[data-action]").count() == 0
    assert await page.text_content("#who") == "read-only"
    assert await page.evaluate("document.documentElement.scrollWidth") <= 390  # fits the phone, no sideways scroll
    approve = {"action": "approve", "task_id": "gated"}
    async with httpx.AsyncClient(base_url=console.url) as http:
        forged = await http.post(f"/api/runs/{run_id}/actions", json=approve)
        assert forged.status_code == 403
        # Even a logged-in session is refused without the page's CSRF token
        await http.get(console.login_url.removeprefix(console.url))
        assert http.cookies.get("orch_session")
        no_csrf = await http.post(f"/api/runs/{run_id}/actions", json=approve)
        assert no_csrf.status_code == 403
    await anyio.sleep(1.0)
    status = await console.cluster.status(run_id)
    assert status is not None
    assert status["tasks"][0]["state"] == "verify_done"
    assert not [e for e in await history(console, run_id) if isinstance(e.body, OverrideGiven)]
