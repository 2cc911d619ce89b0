"""Fixtures of the adversarial suite: a private redis-server and real manager processes, killed by pid."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests._redis import redis_server_path
from tests.integration.harness import Cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    if redis_server_path() is None:
        pytest.skip("redis-server is not on PATH; install Redis 7 to run the adversarial tests")
    c = Cluster(tmp_path)
    try:
        c.redis.start()
        yield c
    finally:
        c.close()


@pytest.fixture
def attacker(cluster: Cluster) -> Iterator[redis.Redis]:
    """A plain redis-py client on the cluster's Redis: all an attacker with network access needs."""
    r = redis.Redis.from_url(cluster.url)
    try:
        yield r
    finally:
        r.close()
