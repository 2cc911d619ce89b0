"""The fleet console's operators: one login per operator key, and each decision signed by its own operator's key."""

from __future__ import annotations

import json
import uuid
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import anyio
import pytest

from orchestrator import processes
from orchestrator.leader import LeaderLease
from orchestrator.trust import load_trust
from protocol.keyring import Keyring, KeyringError
from protocol.keys import OVERRIDES_STREAM, run_snapshot_key
from protocol.messages import Override

pytest.importorskip("starlette", reason="the console needs starlette: pip install 'orchestrator[ui]'")

from orchestrator.ui import console_app  # needs starlette, checked above
from orchestrator.ui.fleet import open_fleet_console

pytestmark = pytest.mark.redis

SUMMARY = {"run_id": "r1", "goal": "g", "state": "running", "reason": "", "tokens": 0,
           "tasks": [{"id": "t", "capability": "python", "state": "verify_done", "stage": "human", "attempts": 1}]}


async def test_each_operator_signs_its_own_decisions(redis_url: str, tmp_path: Path) -> None:
    ring = Keyring.init(tmp_path / "keys", operator="alice")
    ring.add("operator", "bob")
    namespace = f"ui{uuid.uuid4().hex[:8]}"
    async with AsyncExitStack() as stack:
        source, operators = await open_fleet_console(stack, url=redis_url, namespace=namespace, lease_s=5.0,
                                                     keys=ring.path, insecure=False, operators=[])
        assert [op.identity for op in operators.all()] == ["operator:alice", "operator:bob"]
        manager = await stack.enter_async_context(processes.open_bus(
            redis_url, namespace=namespace, lease_s=5.0, retry_budget_s=5.0,
            trust=load_trust(ring, ["manager"], insecure=False, what="a test manager")))
        await manager.put_value(run_snapshot_key("r1"), json.dumps(SUMMARY).encode())
        for op in operators.all():
            await source.act("r1", "t", "approve", feedback="", by=op.identity, bus=op.bus)
        sent = [(env.signer, env.body.by) for _, env in await manager.read(OVERRIDES_STREAM)
                if isinstance(env.body, Override)]
    assert sent == [("operator:alice", "operator:alice"), ("operator:bob", "operator:bob")]


async def test_only_named_operators_get_a_login_and_a_name_without_a_key_is_refused(redis_url: str,
                                                                                     tmp_path: Path) -> None:
    ring = Keyring.init(tmp_path / "keys", operator="alice")
    ring.add("operator", "bob")
    async with AsyncExitStack() as stack:
        _, operators = await open_fleet_console(stack, url=redis_url, namespace="ui-named", lease_s=5.0,
                                                keys=ring.path, insecure=False, operators=["bob"])
        assert [op.identity for op in operators.all()] == ["operator:bob"]
        with pytest.raises(KeyringError, match=r"no private key for operator:carol .*keys add operator carol"):
            await open_fleet_console(stack, url=redis_url, namespace="ui-named", lease_s=5.0, keys=ring.path,
                                     insecure=False, operators=["carol"])


async def _stream_events(app: Any, path: str, events: list[tuple[str, Any]]) -> None:
    """GET ``path`` on the ASGI ``app`` and append each server-sent event as it arrives (until cancelled)."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    disconnected = anyio.Event()
    buffer = b""

    async def receive() -> dict[str, Any]:
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal buffer
        if message["type"] != "http.response.body":
            return
        buffer += message.get("body", b"")
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            fields = dict(line.split(": ", 1) for line in block.decode().splitlines() if ": " in line)
            if "event" in fields:
                events.append((fields["event"], json.loads(fields["data"])))

    try:
        await app(scope, receive, send)
    finally:
        disconnected.set()


async def test_a_run_page_says_when_no_manager_holds_the_lease_and_when_one_does_again(redis_url: str) -> None:
    namespace = f"ui{uuid.uuid4().hex[:8]}"
    events: list[tuple[str, Any]] = []

    async def told(reason_has: str) -> str:
        with anyio.fail_after(10):
            while True:
                reasons = [data["reason"] for kind, data in events if kind == "waiting"]
                if reasons and reason_has in reasons[-1] and (reason_has or not reasons[-1]):
                    return str(reasons[-1])
                await anyio.sleep(0.05)

    async with AsyncExitStack() as stack:
        source, operators = await open_fleet_console(stack, url=redis_url, namespace=namespace, lease_s=5.0,
                                                     keys=None, insecure=True, operators=[])
        app = console_app(source, operators, keepalive_s=0.2)
        lease = LeaderLease(redis_url, name="test-manager", namespace=namespace, lease_s=30)
        stack.push_async_callback(lease.aclose)
        await lease.acquire()
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stream_events, app, "/api/runs/r1/stream", events)
            await anyio.sleep(1.0)  # five keep-alives while a manager leads
            assert [kind for kind, _ in events if kind == "waiting"] == []
            await lease.release()
            reason = await told("no manager holds the manager lease")
            assert f"'{namespace}:{{mgr}}:lease'" in reason
            assert "the run is not moving" in reason
            await lease.acquire()
            assert await told("") == ""
            tg.cancel_scope.cancel()
