"""Fair share and run priority (issue 11, part 3) through real processes.

Times are Redis's (log entry ids: a run's submit to its end event) or the workers' (TASK_STARTED), on one
host. Each test starts its own scheduler and one cpu worker with 2 processes: the fair share is the
scheduler's, metering the ``cpu`` queue to a round of jobs per slot (``NERV_FAIR_JOBS_PER_SLOT``).
"""

from __future__ import annotations

import signal
import time
from typing import Any

import nerv_testtasks as tt
import pytest

from nerv_cluster import EventType, RunStatus, Workflow
from nerv_cluster.model import WORKFLOW_END_EVENTS, Event
from tests.integration.cluster import Cluster
from tests.integration.dagcheck import log_of

pytestmark = pytest.mark.timeout(180)


def _fanout(name: str, n: int) -> Workflow:
    wf = Workflow(name)
    for i in range(n):
        wf.add(tt.add, i, 1, id=f"t{i}")
    return wf


def _ms(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


def _entries(c: Cluster, run_id: str, first: bool) -> list[Any]:
    key = c.client.keys.log(run_id)
    return list(c.redis.xrange(key, count=1) if first else c.redis.xrevrange(key, count=1))  # type: ignore[arg-type]


def _first_and_last(c: Cluster, run_id: str) -> tuple[int, int]:
    """Redis milliseconds of a run's first log entry (its submit) and of its last."""
    return _ms(_entries(c, run_id, True)[0][0]), _ms(_entries(c, run_id, False)[0][0])


def _end_ms(c: Cluster, run_id: str, timeout: float = 120) -> int:
    """Redis milliseconds of the run's end event, polling the log's last entry (``Client.wait`` would
    fold a big run's whole log meanwhile, taking the CPU the runs compete for)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = _entries(c, run_id, False)
        if last and Event.from_json(last[0][1]["e"]).type in WORKFLOW_END_EVENTS:
            return _ms(last[0][0])
        time.sleep(0.05)
    raise AssertionError(f"run {run_id} did not end within {timeout}s")


def _start(c: Cluster, **env: str) -> None:
    c.scheduler(**env)
    c.wait_leader()
    c.worker("cpu", 2)


def test_a_small_run_behind_a_20000_task_fan_out_ends_within_2s_while_the_big_one_goes_on(
    own_cluster: Cluster,
) -> None:
    c = own_cluster
    _start(c)
    big = c.client.submit(_fanout("big", 20_000))
    # The big run is under way: its first tasks ran, and most of it is still to come.
    deadline = time.monotonic() + 30
    while not c.redis.exists(f"{c.client.keys.log(big)}") or c.redis.xlen(c.client.keys.log(big)) < 20_500:
        assert time.monotonic() < deadline, "the big run did not get going"
        time.sleep(0.05)
    held = 20_000 - 32 * sum(c.client.log.queue_lengths(["cpu"]))
    smalls = []
    for i in range(3):
        wf = Workflow(f"small-{i}")
        for j in range(3):
            wf.add(tt.add, j, 1, id=f"s{j}")
        rid = c.client.submit(wf)
        res = c.client.wait(rid, timeout=30)
        assert res.status is RunStatus.COMPLETED, res.reason
        submitted, ended = _first_and_last(c, rid)
        smalls.append((ended - submitted) / 1000)
    last_small_end = _first_and_last(c, rid)[1]
    big_end = _end_ms(c, big)
    assert max(smalls) < 2.0, f"small runs took {smalls} s behind the big one"
    assert big_end > last_small_end, "the big run was over before the small runs: nothing competed"
    assert held > 10_000, "most of the big run waited in the scheduler, not in the Celery queue"
    assert c.client.wait(big, timeout=60).status is RunStatus.COMPLETED


def test_a_high_priority_run_overtakes_normal_ones_submitted_before_it(own_cluster: Cluster) -> None:
    c = own_cluster
    c.scheduler()
    c.wait_leader()
    normal = [c.client.submit(_fanout(f"normal-{i}", 4_000)) for i in range(2)]
    high = c.client.submit(_fanout("high", 4_000), priority="high")
    # The worker starts once every run is in: each has its tasks dispatched and waiting when the first
    # slot frees, so how fast the machine submits changes nothing (the first run got no head start).
    c.worker("cpu", 2)
    ends = {rid: _end_ms(c, rid) for rid in (*normal, high)}
    assert all(c.client.wait(rid, timeout=60).status is RunStatus.COMPLETED for rid in ends)
    assert ends[high] < min(ends[rid] for rid in normal), (
        f"the high-priority run ended at {ends[high]}, the normal ones at {[ends[r] for r in normal]}"
    )


def _starts(c: Cluster, run_id: str) -> list[float]:
    return sorted(ev.ts for ev in log_of(c.client, run_id) if ev.type is EventType.TASK_STARTED)


def test_two_tenants_share_the_workers_by_their_weights(own_cluster: Cluster) -> None:
    c = own_cluster
    c.scheduler(NERV_TENANT_WEIGHTS="team-a=3,team-b=1")
    c.wait_leader()
    b = c.client.submit(_fanout("b", 4_000), tenant="team-b")  # team-b first: FCFS would favour it
    a = c.client.submit(_fanout("a", 4_000), tenant="team-a")
    # The worker starts once every run is in: each has its tasks dispatched and waiting when the first
    # slot frees, so how fast the machine submits changes nothing (the first run got no head start).
    c.worker("cpu", 2)
    for rid in (a, b):
        assert c.client.wait(rid, timeout=90).status is RunStatus.COMPLETED
    sa, sb = _starts(c, a), _starts(c, b)
    # While both had work: from the later first start to the earlier last start.
    lo, hi = max(sa[0], sb[0]), min(sa[-1], sb[-1])
    na = sum(lo <= t <= hi for t in sa)
    nb = sum(lo <= t <= hi for t in sb)
    assert nb > 0 and 2.0 <= na / nb <= 4.5, f"team-a started {na} tasks and team-b {nb} while both ran"


def test_a_scheduler_sigkilled_while_it_holds_tasks_loses_none(own_cluster: Cluster) -> None:
    c = own_cluster
    sched = c.scheduler()
    c.wait_leader()
    c.worker("cpu", 2)
    wf = Workflow("held")
    for i in range(5_000):
        wf.add(tt.counted, id=f"t{i}")
    rid = c.client.submit(wf)
    key = c.client.keys.log(rid)
    deadline = time.monotonic() + 30
    while c.redis.xlen(key) < 5_000 + 1_000:  # every task dispatched, some hundreds started
        assert time.monotonic() < deadline, "the run did not get going"
        time.sleep(0.02)
    queued = 32 * sum(c.client.log.queue_lengths(["cpu"]))
    started = sum(1 for ev in log_of(c.client, rid) if ev.type is EventType.TASK_STARTED)
    assert 5_000 - started - queued > 1_000, "tasks waited in the scheduler when it was killed"
    c.kill(sched, signal.SIGKILL)
    c.scheduler()
    res = c.client.wait(rid, timeout=90)
    assert res.status is RunStatus.COMPLETED, res.reason
    execs = c.execs(rid)
    assert len(execs) == 5_000 and set(execs.values()) == {1}, "every task ran, and once"
