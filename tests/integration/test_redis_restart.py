"""Redis restarted mid-run (its own server, AOF on, on another port): nothing accepted is lost."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import nerv_testtasks as tt
import pytest

from nerv_cluster import EventType, RunStatus, Workflow
from nerv_cluster.embedded import EmbeddedRedis
from tests.integration import dagcheck
from tests.integration.cluster import Cluster
from tests.integration.dagcheck import log_of

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def aof_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    # fsync on every write: a SIGKILLed server loses nothing it acknowledged.
    server = EmbeddedRedis(appendonly=True, dir=tmp_path / "redis", extra_args=["--appendfsync", "always"])
    (tmp_path / "redis").mkdir()
    server.start()
    try:
        yield server
    finally:
        server.close()


def _layers(name: str, levels: int, width: int, seconds: float) -> Workflow:
    return dagcheck.layered(name, levels, width, tt.slow, seconds)


def test_redis_killed_and_restarted_mid_run_loses_nothing(aof_redis: EmbeddedRedis, tmp_path: Path) -> None:
    c = Cluster(aof_redis.url, tmp_path)
    try:
        c.scheduler()
        c.wait_leader()
        c.worker("cpu", 2)
        first = c.client.submit(_layers("before-crash", 5, 3, 0.3))
        second = c.client.submit(_layers("also-before-crash", 3, 2, 0.2))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            done = [ev for ev in log_of(c.client, first) if ev.type is EventType.TASK_COMPLETED]
            if len(done) >= 4:
                break
            time.sleep(0.05)
        aof_redis.kill()  # SIGKILL: a crash, not a clean shutdown
        time.sleep(2)
        aof_redis.start()
        for run_id, n in ((first, 15), (second, 6)):
            res = c.client.wait(run_id, timeout=120)
            assert res.status is RunStatus.COMPLETED, (run_id, res.reason)
            completed = Counter(
                ev.task_id for ev in log_of(c.client, run_id) if ev.type is EventType.TASK_COMPLETED
            )
            assert len(completed) == n and set(completed.values()) == {1}, completed
        # and the cluster still takes new work
        after = Workflow("after-restart")
        after.add(tt.add, 40, 2, id="answer")
        assert c.client.wait(c.client.submit(after), timeout=60).results == {"answer": 42}
    finally:
        c.stop()
