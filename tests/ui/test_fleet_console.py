"""The fleet console's operators: one login per operator key, and each decision signed by its own operator's key."""

from __future__ import annotations

import json
import uuid
from contextlib import AsyncExitStack
from pathlib import Path

import pytest

from orchestrator import processes
from orchestrator.trust import load_trust
from protocol.keyring import Keyring, KeyringError
from protocol.keys import OVERRIDES_STREAM, run_snapshot_key
from protocol.messages import Override

pytest.importorskip("starlette", reason="the console needs starlette: pip install 'orchestrator[ui]'")

from orchestrator.ui.fleet import open_fleet_console  # needs starlette, checked above

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
