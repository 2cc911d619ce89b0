"""Fixtures of the browser tests: a real cluster (Redis, manager, Python worker, ``orchestrator ui``) and Chromium.

Chromium is Debian's ``chromium`` package driven by Playwright (no browser download); the tests
skip, saying why, where either is missing.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest

from protocol.keyring import Keyring
from tests._redis import free_port
from tests.integration.harness import Cluster

CHROMIUM = "chromium"


@dataclass
class Console:
    """A running ``orchestrator ui`` and the cluster it shows."""

    cluster: Cluster
    url: str
    login_url: str


def _chromium() -> str:
    path = shutil.which(CHROMIUM)
    if path is None:
        pytest.skip("no browser: the chromium package is not installed (apt-get install -y chromium)")
    try:
        import playwright.async_api  # noqa: F401 - only whether it imports
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")
    return path



@pytest.fixture
async def console(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Console:
    """Manager, a Python worker and the console (operator ``alice``) on the cluster's Redis, every message signed.

    The test's own keyring holds alice's key (the console's), the test client's (``operator:tests``),
    the manager's and the python worker's; every process finds it through ORCH_KEYS.
    """
    _chromium()
    ring = Keyring.init(cluster.tmp / "keys", operator="alice")
    ring.add("operator", "tests")
    ring.add("worker", "python")
    monkeypatch.setenv("ORCH_KEYS", str(ring.path))
    cluster.manager()
    cluster.spawn("python-worker", ["worker", "--redis", cluster.url, "--capability", "python", "--lease-s", "5",
                                     "--config", json.dumps({"timeout_s": 60})])
    port = free_port()
    proc = cluster.spawn("ui", ["ui", "--redis", cluster.url, "--port", str(port), "--operator", "alice"])
    login = None
    with anyio.fail_after(20):
        while login is None:
            assert proc.alive, proc.log.read_text()
            found = re.search(r"log in as operator:alice: (http://\S+)", proc.log.read_text())
            login = found.group(1) if found else None
            await anyio.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(10):
            while True:
                try:
                    if (await http.get(f"{url}/api/me")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.1)
    return Console(cluster, url, login)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    path = _chromium()
    from playwright.async_api import async_playwright

    pw = await async_playwright().start()
    try:
        # --no-sandbox: tests may run as root (CI), where Chromium's sandbox refuses to start
        chromium = await pw.chromium.launch(executable_path=path, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            await chromium.close()
    finally:
        await pw.stop()
