"""Circuit breaker: consecutive failures open it, attempts fail fast, a trial after cool-down closes it."""

from __future__ import annotations

import nerv_testtasks as tt
import pytest

from nerv_cluster import EventType, RunStatus, TaskStatus, Workflow
from nerv_cluster.model import CircuitBreaker
from tests.integration.cluster import Cluster
from tests.integration.dagcheck import log_of

pytestmark = pytest.mark.timeout(120)


def test_circuit_opens_fails_fast_then_a_trial_closes_it(own_cluster: Cluster) -> None:
    c = own_cluster
    c.scheduler()
    c.wait_leader()
    c.worker("cpu", 2)
    breaker = CircuitBreaker(failures=2, cooldown=2.0)
    wf = Workflow("circuit")
    prev = None
    plan = [("c1", True), ("c2", True), ("c3", False), ("c4", False)]
    for tid, fail in plan:
        deps = [prev] if prev is not None else []
        prev = wf.add(tt.maybe_fail, fail, id=tid, circuit=breaker, dependencies=deps, trigger="all_done")
    pause = wf.add(tt.slow, 2.5, id="pause", dependencies=[prev], trigger="all_done")
    wf.add(tt.maybe_fail, False, id="c5", circuit=breaker, dependencies=[pause], trigger="all_done")
    run_id = c.client.submit(wf)
    res = c.client.wait(run_id, timeout=60)
    t = res.tasks
    assert t["c1"].status is TaskStatus.FAILED and t["c2"].status is TaskStatus.FAILED
    for tid in ("c3", "c4"):
        assert t[tid].status is TaskStatus.FAILED
        assert t[tid].error is not None and t[tid].error.type == "CircuitOpenError", t[tid].error
    assert t["c5"].status is TaskStatus.COMPLETED, t["c5"].error
    assert res.status is RunStatus.FAILED  # c1's failure is not handled by anything
    assert c.execs(run_id) == {"c1": 1, "c2": 1, "pause": 1, "c5": 1}, "open-circuit attempts must not run"
    transitions = [
        ev.type
        for ev in log_of(c.client, run_id)
        if ev.type in (EventType.CIRCUIT_OPENED, EventType.CIRCUIT_HALF_OPENED, EventType.CIRCUIT_CLOSED)
    ]
    assert transitions == [EventType.CIRCUIT_OPENED, EventType.CIRCUIT_HALF_OPENED, EventType.CIRCUIT_CLOSED]
    stream = [ev.type for ev in c.client.log.circuit_events()]
    assert stream == transitions, "transitions are also kept in the cluster-wide circuits stream"
