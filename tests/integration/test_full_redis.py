"""Fault drill (issue 17): Redis at its ``maxmemory`` (``noeviction``). Submissions get a clear
``StoreFullError`` and write nothing; nothing accepted is corrupted; once memory is there again, every
accepted run completes with each result recorded once."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import nerv_testtasks as tt
import pytest
import redis

from nerv_cluster import Client, EventType, RunStatus, Workflow
from nerv_cluster.embedded import EmbeddedRedis
from nerv_cluster.errors import IntakeTimeoutError, StoreFullError
from tests.integration.cluster import Cluster
from tests.integration.dagcheck import log_of

pytestmark = [pytest.mark.fault_drill, pytest.mark.timeout(120)]

#: Our own server (a port of this suite's HA range), so a full memory bothers no other test.
PORT = 16396
TASKS = 10
HEADROOM = 2 * 1024 * 1024


@pytest.fixture
def small_redis(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(PORT, dir=tmp_path / "redis").start()  # noeviction, like the deploy files
    try:
        yield server
    finally:
        server.close()


def _workflow(i: int) -> Workflow:
    wf = Workflow(f"fill-{i}")
    for t in range(TASKS):
        wf.add(tt.counted, "x" * 4000, id=f"t{t}")
    return wf


def test_full_redis_refuses_clearly_corrupts_nothing(small_redis: EmbeddedRedis, tmp_path: Path) -> None:
    c = Cluster(small_redis.url, tmp_path)
    admin = redis.Redis(port=small_redis.port, decode_responses=True)
    try:
        c.scheduler()
        c.wait_leader()
        c.worker("cpu", 2)
        used = int(admin.info("memory")["used_memory"])
        admin.config_set("maxmemory", used + HEADROOM)
        accepted: list[str] = []
        refused: StoreFullError | None = None
        # A request the intake took in just before it filled up waits for a scheduler that cannot act
        # (its own writes are refused too): the client gives up, and the request is applied later.
        client = Client(settings=c.client.settings.with_(intake_timeout=5.0))
        pending: list[str] = []
        for i in range(2_000):
            wf = _workflow(i)
            try:
                accepted.append(client.submit(wf, run_id=f"fill-{i}", check_names=False))
            except StoreFullError as exc:
                refused = exc
                break
            except IntakeTimeoutError as exc:
                assert "may still be applied" in str(exc) and f"fill-{i}" in str(exc)
                assert not c.client.log.run_exists(f"fill-{i}"), "only the scheduler writes a run log"
                pending.append(f"fill-{i}")
        client.close()
        assert refused is not None, "Redis never filled up"
        assert "Redis is full" in str(refused) and "nothing written" in str(refused)
        assert len(accepted) > 5
        refused_run = str(refused).split("'")[1]
        assert refused_run.startswith("fill-")
        assert not c.client.log.run_exists(refused_run), "a refused submission left something behind"
        time.sleep(1.0)  # the scheduler and workers run into the full memory too
        # Nothing accepted is corrupted: each log decodes whole and starts with its submission.
        for run_id in accepted:
            raw = admin.xrange(c.client.keys.log(run_id))
            events = log_of(c.client, run_id)
            assert len(events) == len(raw), f"{run_id}: undecodable entries"
            assert events[0].type is EventType.WORKFLOW_SUBMITTED and events[0].run_id == run_id
        # Memory again: everything accepted completes, each result recorded once.
        admin.config_set("maxmemory", 0)
        for run_id in accepted + pending:  # a request taken in is never lost
            res = c.client.wait(run_id, timeout=60)
            assert res.status is RunStatus.COMPLETED, (run_id, res.reason)
            log = log_of(c.client, run_id)
            done = Counter(ev.task_id for ev in log if ev.type is EventType.TASK_COMPLETED)
            assert len(done) == TASKS and set(done.values()) == {1}, (run_id, done)
    finally:
        admin.config_set("maxmemory", 0)
        c.stop()
