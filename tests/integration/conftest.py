"""Fixtures that run real Redis-backed clusters of scheduler and worker processes."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import TEST_REDIS_URL
from tests.integration.cluster import HERE, Cluster

# The client side imports the test task module too (for handles to registered functions).
sys.path.insert(0, str(HERE))

#: Database numbers: the shared cluster, then one per fault test in turn (each flushes its own).
#: 13 is left to the benchmarks, 8 to manual runs.
SHARED_DB = 9
_OWN_DBS = [10, 11, 12, 14, 15]
_next_db = [0]


def _require_redis() -> None:
    try:
        redis.Redis.from_url(TEST_REDIS_URL, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        pytest.fail(f"integration tests need Redis at {TEST_REDIS_URL} (set NERV_TEST_REDIS_URL): {exc}")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One scheduler, a cpu worker (2 processes) and an io worker (4 threads), shared by the session."""
    _require_redis()
    c = Cluster(f"{TEST_REDIS_URL}/{SHARED_DB}", tmp_path_factory.mktemp("cluster"))
    c.flush()
    try:
        c.scheduler()
        c.wait_leader()
        c.worker("cpu", 2)
        c.worker("io", 4)
        yield c
    finally:
        c.stop()


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A fresh, empty cluster database for a test that kills things; start processes in the test."""
    _require_redis()
    db = _OWN_DBS[_next_db[0] % len(_OWN_DBS)]
    _next_db[0] += 1
    c = Cluster(f"{TEST_REDIS_URL}/{db}", tmp_path)
    c.flush()
    try:
        yield c
    finally:
        c.stop()
