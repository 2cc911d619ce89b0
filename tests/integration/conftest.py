"""Fixtures of the fault tests: a Cluster per test, every process killed by pid at the end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._redis import redis_server_path
from tests.integration.harness import Cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    if redis_server_path() is None:
        pytest.skip("redis-server is not on PATH; install Redis 7 to run the fault tests")
    c = Cluster(tmp_path)
    try:
        c.redis.start()
        yield c
    finally:
        c.close()
