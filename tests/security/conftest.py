"""Fixtures of the adversarial suite: a private redis-server and real manager processes, killed by pid."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from tests.integration.harness import Cluster


@pytest.fixture
def attacker(cluster: Cluster) -> Iterator[redis.Redis]:
    """A plain redis-py client on the cluster's Redis: all an attacker with network access needs."""
    r = redis.Redis.from_url(cluster.url)
    try:
        yield r
    finally:
        r.close()
