"""Fault drills for Redis high availability (issue 17): a primary, two replicas, three Sentinels.

The whole cluster (client, scheduler, workers, the Celery broker) speaks to Redis through
``sentinel://`` with ``NERV_REDIS_MIN_REPLICAS=1``. Drill 1 SIGKILLs the primary mid-run; drill 2 cuts
the old primary off (SIGSTOP for longer than the failover) and lets it come back (SIGCONT).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import nerv_testtasks as tt
import pytest
import redis

from nerv_cluster import EventType, RunStatus, Workflow
from nerv_cluster.errors import ReplicationError
from nerv_cluster.eventlog import EventLog
from nerv_cluster.model import Event, new_run_id
from nerv_cluster.replication import Replication
from scheduler.lease import Lease
from tests.integration import dagcheck
from tests.integration.cluster import Cluster
from tests.integration.dagcheck import log_of
from tests.integration.sentinels import HaRedis

pytestmark = [pytest.mark.fault_drill, pytest.mark.timeout(120)]

HA_ENV = {
    "NERV_REDIS_MIN_REPLICAS": "1",
    "NERV_REDIS_REPLICA_TIMEOUT_MS": "500",
    # A paused primary: give up on a command after 2 s and ask the Sentinels again.
    "NERV_REDIS_SOCKET_TIMEOUT": "2",
}


@pytest.fixture
def ha(tmp_path: Path) -> Iterator[HaRedis]:
    servers = HaRedis(tmp_path / "redis").start()
    try:
        yield servers
    finally:
        servers.close()


def _layers(name: str, levels: int, width: int, seconds: float) -> Workflow:
    return dagcheck.layered(name, levels, width, tt.slow, seconds)


def _completed_once(c: Cluster, run_id: str, n: int) -> None:
    """The run completed, each of its ``n`` tasks has exactly one recorded result."""
    res = c.client.wait(run_id, timeout=60)
    assert res.status is RunStatus.COMPLETED, (run_id, res.reason)
    done = Counter(ev.task_id for ev in log_of(c.client, run_id) if ev.type is EventType.TASK_COMPLETED)
    assert len(done) == n, (run_id, len(done))
    assert set(done.values()) == {1}, [t for t, k in done.items() if k > 1]


def _wait_completed(c: Cluster, run_id: str, count: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sum(ev.type is EventType.TASK_COMPLETED for ev in log_of(c.client, run_id)) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} never reached {count} completed tasks")


class _Submitter(threading.Thread):
    """Submits small runs one after another; remembers when each submission was acknowledged."""

    def __init__(self, c: Cluster) -> None:
        super().__init__(daemon=True)
        self.c = c
        self.acked: list[tuple[float, str]] = []
        self.refused = 0
        self.stop = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            wf = Workflow(f"small-{i}")
            wf.add(tt.add, i, 1, id="one")
            try:
                run_id = self.c.client.submit(wf, check_names=False)
            except (ReplicationError, redis.RedisError):
                self.refused += 1  # not acknowledged: the caller would retry
            else:
                self.acked.append((time.monotonic(), run_id))
            i += 1
            time.sleep(0.02)


def test_primary_sigkilled_mid_run_loses_nothing_acknowledged(ha: HaRedis, tmp_path: Path) -> None:
    c = Cluster(ha.url, tmp_path, **HA_ENV)
    sub = _Submitter(c)
    try:
        c.scheduler()
        c.wait_leader()
        c.worker("cpu", 2)
        big = c.client.submit(_layers("failover-big", 6, 50, 0.005))  # 300 tasks
        sub.start()
        _wait_completed(c, big, 60)
        killed_at = time.monotonic()
        ha.signal(0, signal.SIGKILL)
        ha.wait_failover()
        time.sleep(1.0)  # some submissions after the failover too
        sub.stop.set()
        sub.join(timeout=30)
        before = [rid for at, rid in sub.acked if at < killed_at]
        assert before, "no submission was acknowledged before the kill"
        assert any(at > killed_at for at, _ in sub.acked), "no submission was accepted after the failover"
        _completed_once(c, big, 300)
        for run_id in [rid for _, rid in sub.acked]:
            _completed_once(c, run_id, 1)
    finally:
        sub.stop.set()
        c.stop()


def test_old_primary_back_from_a_partition_is_not_acted_on(ha: HaRedis, tmp_path: Path) -> None:
    c = Cluster(ha.url, tmp_path, **HA_ENV)
    try:
        c.scheduler()
        c.wait_leader()
        c.worker("cpu", 2)
        big = c.client.submit(_layers("partition-big", 4, 50, 0.005))  # 200 tasks
        _wait_completed(c, big, 40)
        keys = c.client.keys
        # Processes that hold a connection to the old primary from before the partition: one that waits
        # for replicas as the cluster does, one that does not (a misconfigured client).
        old = redis.Redis(port=ha.nodes[0].port, decode_responses=True, socket_timeout=5)
        old.ping()
        careful = EventLog(old, keys, Replication(1, 500, tries=1))
        careless = EventLog(old, keys)
        lease = Lease(careful, ttl_ms=60_000)

        ha.signal(0, signal.SIGSTOP)
        ha.wait_failover()
        time.sleep(ha_failover_margin())
        ha.signal(0, signal.SIGCONT)

        # Straight after the partition heals, the old primary still thinks it leads (until the Sentinels
        # demote it): what it accepts now is what must never be acted on.
        was_primary = ha.info(0).get("role") == "master"
        cut_off = [_submission("after-partition-waited"), _submission("after-partition-unwaited")]
        with pytest.raises((ReplicationError, redis.ReadOnlyError)):
            careful.submit(cut_off[0])  # never acknowledged to its caller
        accepted = False
        with contextlib.suppress(redis.ReadOnlyError):  # refused already: demoted meanwhile
            accepted = careless.submit(cut_off[1])  # acknowledged by the old primary alone
        try:
            took = lease.acquire()
        except redis.ReadOnlyError:
            took = False
        assert not took, "a scheduler on the old primary took the lease"
        print(f"old primary still primary: {was_primary}; accepted an unreplicated submission: {accepted}")

        # The old primary becomes a replica of the new one and forgets what only it accepted.
        ha._wait(lambda: ha.info(0).get("master_link_status") == "up", 20, "old primary never rejoined")
        for ev in cut_off:
            assert not c.client.log.run_exists(ev.run_id), f"{ev.run_id} was accepted by the cut-off primary"
            assert not old.exists(keys.log(ev.run_id))
        _completed_once(c, big, 200)
        assert not c.execs(cut_off[1].run_id)
        # and the cluster goes on
        after = Workflow("after-partition")
        after.add(tt.add, 40, 2, id="answer")
        assert c.client.wait(c.client.submit(after), timeout=30).results == {"answer": 42}
    finally:
        c.stop()


def ha_failover_margin() -> float:
    """How long the old primary stays cut off after the failover (so it is surely past it)."""
    return 1.0


def _submission(name: str) -> Event:
    """A WORKFLOW_SUBMITTED of a one-task run, built as the client builds it."""
    wf = Workflow(name)
    wf.add(tt.counted, id="t")
    data = {"workflow": wf.definition().to_dict()}
    return Event(EventType.WORKFLOW_SUBMITTED, new_run_id(name), data=data, source="client")
