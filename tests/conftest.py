"""Shared fixtures: one bus fixture per implementation, so the contract suite runs against each."""

from __future__ import annotations

import gc
import logging
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import structlog

from protocol.bus import Bus, BusSettings, MemoryBus
from tests._redis import RedisServer, redis_server_path

if TYPE_CHECKING:
    from tests.integration.harness import Cluster

BusFactory = Callable[[BusSettings], Awaitable[Bus]]

FAST = BusSettings(lease_s=0.3, max_deliveries=3, block_s=0.05)

_redis_urls: list[str] = []  # set by the session-scoped ``redis_url`` fixture

# Job files name checks, they never import code: the test checks are allowed the way an operator allows
# a module's checks (ORCH_ALLOW_CHECKS), here and in every process a test starts.
TEST_CHECKS = tuple(f"tests.orchestrator.checks:{name}"
                    for name in ("is_even", "short", "async_verdict", "explodes", "returns_nonsense"))
os.environ["ORCH_ALLOW_CHECKS"] = ",".join(TEST_CHECKS)


async def _memory_bus(settings: BusSettings) -> Bus:
    return MemoryBus(settings)


async def _redis_bus(settings: BusSettings) -> Bus:
    from protocol.redis_bus import RedisBus

    if not _redis_urls:
        raise RuntimeError("request the redis_url fixture before building a RedisBus")
    # A fresh namespace per bus isolates tests sharing the session's server.
    return RedisBus.from_url(_redis_urls[-1], settings=settings, namespace=f"t{uuid.uuid4().hex[:10]}",
                             retry_budget_s=5.0)


BUS_FACTORIES: dict[str, BusFactory] = {"memory": _memory_bus, "redis": _redis_bus}
_MARKS = {"redis": [pytest.mark.redis]}


@pytest.fixture(scope="module", autouse=True)
def _collect_garbage_per_module() -> Iterator[None]:
    """Collect garbage as each module ends, so an unclosed socket or transport fails there.

    Warnings are errors here, and a leak otherwise surfaces wherever the collector happens to
    run next: in an unrelated test, in another module, depending on test order.
    """
    yield
    gc.collect()


# Every capability a test serves from a worker process or a signed bus. Processes started by tests find
# the session's keyring through ORCH_KEYS, as a deployment's would; a capability missing here fails with
# "no private key for worker:<cap>", which names the line to change.
TEST_CAPABILITIES = ["adder", "aliased", "asker", "bench", "blocker", "broken", "c", "coin", "crashy", "drafter", "echo", "effect", "flaky", "gate", "ghost", "lax", "learner", "llm", "mine", "named", "noop", "nope", "objects", "open", "other", "picky", "pyhton", "python", "same", "selfcheck", "shout", "sleeper", "slow", "slowcheck", "slugify", "step", "str", "stubborn", "stuck", "suffix", "syncpicky", "waiter", "worker", "writer", "x", "y"]


@pytest.fixture(scope="session", autouse=True)
def test_keyring(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One keyring for the session (manager, operators, a worker key per test capability), in ORCH_KEYS."""
    from protocol.keyring import Keyring

    path = tmp_path_factory.mktemp("keys")
    ring = Keyring.init(path, operator="tests")
    for capability in TEST_CAPABILITIES:
        ring.add("worker", capability)
    for person in ("alice", "bob", "carol", "dave"):  # operators who sign with --as NAME
        ring.add("operator", person)
    saved = {name: os.environ.get(name) for name in ("ORCH_KEYS", "ORCH_OPERATOR")}
    os.environ.update(ORCH_KEYS=str(path), ORCH_OPERATOR="tests")  # clients sign as operator:tests unless --as
    try:
        yield path
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server for one test (its own port and data dir), stopped by pid at the end."""
    if redis_server_path() is None:
        pytest.skip("redis-server is not on PATH")
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A private redis-server plus the managers and workers a test starts, every process killed by pid at the end."""
    from tests.integration.harness import Cluster

    if redis_server_path() is None:
        pytest.skip("redis-server is not on PATH; install Redis 7 to run these tests")
    c = Cluster(tmp_path)
    try:
        c.redis.start()
        yield c
    finally:
        c.close()


@pytest.fixture
def debug_logs() -> Iterator[None]:
    """Let every log level through for the test: tests that ran earlier may have configured WARNING."""
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        yield
    finally:
        structlog.configure(**saved)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway redis-server on a free port (no persistence), stopped by pid at the end.

    ``ORCH_TEST_REDIS_URL`` points the tests at an existing Redis instead (a CI service
    container without the binary). Every test works in its own key namespace and nothing is
    flushed, but use a server nothing else depends on.
    """
    external = os.environ.get("ORCH_TEST_REDIS_URL")
    if external:
        _redis_urls.append(external)
        try:
            yield external
        finally:
            _redis_urls.remove(external)
        return
    if redis_server_path() is None:
        pytest.skip("redis-server is not on PATH and ORCH_TEST_REDIS_URL is not set; install Redis 7 "
                    "to run the redis tests")
    server = RedisServer(Path(tmp_path_factory.mktemp("redis"))).start()
    _redis_urls.append(server.url)
    try:
        yield server.url
    finally:
        _redis_urls.remove(server.url)
        server.stop()


@pytest.fixture(params=[pytest.param(name, marks=_MARKS.get(name, [])) for name in sorted(BUS_FACTORIES)])
def bus_factory(request: pytest.FixtureRequest) -> BusFactory:
    """Each bus implementation, by name."""
    if request.param == "redis":
        request.getfixturevalue("redis_url")
    return BUS_FACTORIES[request.param]


@pytest.fixture
async def bus(bus_factory: BusFactory) -> AsyncIterator[Bus]:
    """A bus with short leases, so reclaim and dead-letter tests run in fractions of a second."""
    async with await bus_factory(FAST) as b:
        yield b
