"""Limits (issue 11, part "limits"): concurrency keys and rate limits through real processes.

Counters in Redis (``nerv_testtasks.limited``: running now, peak, executions) prove "never more than
N at once"; start times come from the log (TASK_DISPATCHED, the scheduler's clock) and from the workers.
"""

from __future__ import annotations

import os
import signal
import time

import nerv_testtasks as tt
import pytest

from nerv_cluster import EventType, RunStatus, Workflow
from tests.integration.cluster import Cluster
from tests.integration.dagcheck import log_of

pytestmark = pytest.mark.timeout(120)


def _counter(c: Cluster, label: str, what: str) -> int:
    return int(c.redis.get(f"test:lim:{label}:{what}") or 0)


def _limited_run(label: str, n: int, seconds: float, name: str = "limited") -> Workflow:
    wf = Workflow(name)
    for i in range(n):
        wf.add(tt.limited, label, seconds, id=f"t{i}")
    return wf


def _owner(c: Cluster, worker_id: str):  # type: ignore[no-untyped-def]
    """The worker whose process group holds the pid in a nerv worker id (host:pid:rand)."""
    pgid = os.getpgid(int(worker_id.split(":")[1]))
    return next(p for p in c.procs if p.pid == pgid)


def _wait(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_peak_running_equals_the_limit_across_three_runs_and_two_workers(own_cluster: Cluster) -> None:
    c = own_cluster
    c.scheduler()
    c.wait_leader()
    c.worker("io", 4)
    c.worker("io", 4)  # 8 slots for a key whose limit is 2
    label = "peak"
    t0 = time.monotonic()
    runs = [c.client.submit(_limited_run(label, 6, 0.3, f"limited-{i}")) for i in range(3)]
    for rid in runs:
        res = c.client.wait(rid, timeout=60)
        assert res.status is RunStatus.COMPLETED, res.reason
    elapsed = time.monotonic() - t0
    assert _counter(c, label, "runs") == 18
    assert _counter(c, label, "peak") == 2, "the peak running count with one key must equal its limit"
    assert elapsed >= 18 / 2 * 0.3 * 0.9, f"18 tasks of 0.3 s two at a time took only {elapsed:.2f}s"
    held = [ev for rid in runs for ev in log_of(c.client, rid) if ev.type is EventType.TASK_HELD]
    assert held and "crm:peak" in held[0].data["reason"]
    dispatched = [ev for rid in runs for ev in log_of(c.client, rid) if ev.type is EventType.TASK_DISPATCHED]
    assert {ev.data.get("slot") for ev in dispatched} == {"crm:peak"}


def test_a_worker_sigkilled_while_holding_the_slot_frees_it(own_cluster: Cluster) -> None:
    c = own_cluster
    c.scheduler()
    c.wait_leader()
    c.worker("io", 2)
    label = "killed"
    wf = Workflow("hang")
    for i in range(3):
        wf.add(tt.limited_hang, label, 0.2, id=f"h{i}")
    rid = c.client.submit(wf)
    _wait(lambda: _counter(c, label, "runs") == 1, 30, "the first execution")
    started = next(ev for ev in log_of(c.client, rid) if ev.type is EventType.TASK_STARTED)
    time.sleep(0.5)
    assert _counter(c, label, "runs") == 1, "the other two are held while the slot is taken"
    c.worker("io", 2)
    c.kill(_owner(c, started.data["worker"]), signal.SIGKILL)  # the slot's holder dies with its host
    # Its execution never leaves: count afresh from here.
    c.redis.set(f"test:lim:{label}:running", 0)
    c.redis.set(f"test:lim:{label}:peak", 0)
    res = c.client.wait(rid, timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert _counter(c, label, "runs") == 4  # the hung one ran again (its worker was lost), plus two
    assert _counter(c, label, "peak") == 1
    events = log_of(c.client, rid)
    assert any(ev.type is EventType.TASK_PENDING and "lost" in ev.data["reason"] for ev in events)


def test_rate_limited_starts_never_exceed_the_rate_in_any_window(own_cluster: Cluster) -> None:
    c = own_cluster
    c.scheduler()
    c.wait_leader()
    c.worker("io", 4)
    c.worker("io", 4)
    label = "rate"
    runs = []
    for r in range(2):
        wf = Workflow(f"rated-{r}")
        for i in range(10):
            wf.add(tt.rated, label, id=f"r{i}")
        runs.append(c.client.submit(wf))
    for rid in runs:
        res = c.client.wait(rid, timeout=60)
        assert res.status is RunStatus.COMPLETED, res.reason
    decided = sorted(
        ev.ts for rid in runs for ev in log_of(c.client, rid) if ev.type is EventType.TASK_DISPATCHED
    )
    assert len(decided) == 20
    # At most 5 in any window of 1 s: the 6th start after any start is at least 1 s later.
    gaps = [decided[i + 5] - decided[i] for i in range(len(decided) - 5)]
    assert min(gaps) >= 1.0 - 1e-6, f"6 starts within {min(gaps):.3f}s"
    on_workers = sorted(float(t) for t in c.redis.lrange(f"test:rate:{label}", 0, -1))
    assert len(on_workers) == 20
    assert on_workers[-1] - on_workers[0] >= 3 * 0.9, "20 starts at 5 a second span at least 3 s"
    # The scheduler decides the starts (above); a worker begins one after its message's delivery, whose
    # delay varies (a loaded host: hundreds of ms), so two windows' starts may bunch, never more.
    worker_gaps = [on_workers[i + 10] - on_workers[i] for i in range(len(on_workers) - 10)]
    assert min(worker_gaps) >= 1.0, f"workers saw 11 starts within {min(worker_gaps):.3f}s"


def test_set_limit_at_run_time_survives_a_scheduler_restart(own_cluster: Cluster) -> None:
    c = own_cluster
    sched = c.scheduler()
    c.wait_leader()
    c.worker("io", 4)
    c.worker("io", 4)
    label = "setlimit"
    c.client.set_limit(f"crm:{label}", 0)  # hold every task of the key
    rid = c.client.submit(_limited_run(label, 12, 0.5))
    _wait(lambda: sum(ev.type is EventType.TASK_HELD for ev in log_of(c.client, rid)) == 12, 20, "all held")
    time.sleep(1.0)
    assert _counter(c, label, "runs") == 0
    c.kill(sched, signal.SIGKILL)
    c.scheduler()
    c.wait_leader(timeout=20)
    time.sleep(2.0)  # the new leader refolded the limits stream: still nothing runs
    assert _counter(c, label, "runs") == 0
    assert c.client.limits() == {f"crm:{label}": 0}
    c.client.set_limit(f"crm:{label}", 4)  # more than the declared 2
    res = c.client.wait(rid, timeout=60)
    assert res.status is RunStatus.COMPLETED, res.reason
    assert _counter(c, label, "runs") == 12
    assert _counter(c, label, "peak") == 4
