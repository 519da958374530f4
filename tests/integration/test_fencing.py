"""Fencing across data loss: Redis loses its last writes (AOF ``everysec``), the lease key vanishes and
the epoch counter rolls back, and a second scheduler takes the lease while the first still believes it
leads. Tokens carry a random part, so the two never share one: the old leader's writes and renewals
fail and it steps down (issue 10, point 4)."""

from __future__ import annotations

import signal
import time
from collections import Counter

import nerv_testtasks as tt
import pytest

from nerv_cluster import EventType, RunStatus, Settings, Workflow
from nerv_cluster.errors import LeaseLostError
from nerv_cluster.eventlog import EventLog
from nerv_cluster.model import Event
from scheduler.lease import Lease
from tests.integration.cluster import Cluster
from tests.integration.dagcheck import assert_ran_once_in_order, log_of

pytestmark = pytest.mark.timeout(180)


def _lose_the_lease(c: Cluster) -> None:
    """What a lost second of AOF does to the lease: its key is gone and the counter is one back."""
    keys = c.client.keys
    pipe = c.redis.pipeline(transaction=True)
    pipe.delete(keys.lease)
    pipe.decr(keys.epoch)
    pipe.execute()


def test_tokens_stay_unique_when_redis_rolls_the_epoch_counter_back(own_cluster: Cluster) -> None:
    c = own_cluster
    log = EventLog(c.redis, Settings.from_env(c.env).keys())
    old, new = Lease(log, ttl_ms=10_000), Lease(log, ttl_ms=10_000)
    assert old.acquire()
    old_token = old.token
    assert old_token is not None
    _lose_the_lease(c)
    assert new.acquire()
    assert new.token is not None
    # The counter handed out the same number again; the tokens still differ.
    assert new.token.split("-")[0] == old_token.split("-")[0]
    assert new.token != old_token, "two lease holders share a fencing token"
    probe = Event(EventType.WORKFLOW_STARTED, "fenced-run")
    with pytest.raises(LeaseLostError):
        log.append_fenced([probe], old_token)
    assert not old.renew(), "the old holder renewed the new holder's lease"
    assert old.token is None
    assert c.redis.get(c.client.keys.lease) == new.token
    assert log.append_fenced([probe], new.token) == []
    assert new.renew()


def test_old_leader_steps_down_after_the_lease_was_lost_with_redis_writes(own_cluster: Cluster) -> None:
    c = own_cluster
    # A long lease, so the paused leader still believes it holds it when it wakes up: the dangerous case.
    c.env["NERV_LEASE_TTL_MS"] = "8000"
    first = c.scheduler()
    c.wait_leader()
    c.wait_log(first, "leader (token")
    second = c.scheduler()
    c.wait_log(second, "waiting for the lease")
    c.worker("cpu", 2)
    wf = Workflow("fence-loss")
    parents: dict[str, list[str]] = {}
    prev: list = []
    for lv in range(12):
        layer = [wf.add(tt.slow, 0.3, id=f"L{lv}-{i}", dependencies=prev) for i in range(2)]
        for h in layer:
            parents[h.id] = [p.id for p in prev]
        prev = layer
    run_id = c.client.submit(wf)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if sum(ev.type is EventType.TASK_COMPLETED for ev in log_of(c.client, run_id)) >= 4:
            break
        time.sleep(0.05)
    old_token = c.redis.get(c.client.keys.lease)
    assert old_token is not None

    # The leader pauses (as in a GC pause or a stalled VM) while Redis loses its last writes; the standby
    # takes the lease; then the old leader wakes up, still within what it believes is its lease.
    c.kill(first, signal.SIGSTOP)
    try:
        _lose_the_lease(c)
        deadline = time.monotonic() + 15
        while not c.redis.get(c.client.keys.lease) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        c.kill(first, signal.SIGCONT)
    new_token = c.redis.get(c.client.keys.lease)
    assert new_token, f"the standby did not take the lease; its log:\n{c.tail(second)}"
    assert new_token.split("-")[0] == old_token.split("-")[0], "the epoch counter did not repeat itself"

    res = c.client.wait(run_id, timeout=90)
    assert res.status is RunStatus.COMPLETED, res.reason
    events = log_of(c.client, run_id)
    dispatched = Counter(ev.task_id for ev in events if ev.type is EventType.TASK_DISPATCHED)
    twice = sorted(t for t, n in dispatched.items() if n > 1)
    assert not twice, f"tasks dispatched more than once (two leaders): {twice}"
    assert sorted(dispatched) == sorted(parents)
    assert c.execs(run_id) == dict.fromkeys(parents, 1), "a task ran twice or never"
    assert_ran_once_in_order(events, parents)
    assert new_token != old_token
    c.wait_log(first, "stepping down", timeout=10)
    assert events[-1].source == f"scheduler:{new_token}", "the new leader finished the run"
    assert first.poll() is None and second.poll() is None
