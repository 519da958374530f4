"""Workers whose clocks are off (Debian's ``faketime``): deadlines are measured on one clock, Redis's,
which dates every logged event; a worker's own clock never decides a timeout or a retry's delay
(issue 10, point 6)."""

from __future__ import annotations

import shutil

import nerv_testtasks as tt
import pytest

from nerv_cluster import EventType, RetryPolicy, RunStatus, Workflow
from nerv_cluster.errors import WaitTimeoutError
from tests.integration.cluster import Cluster

pytestmark = [
    pytest.mark.timeout(150),
    pytest.mark.skipif(
        shutil.which("faketime") is None,
        reason="Debian's faketime is not installed (apt-get install faketime; .ci/run installs it as root)",
    ),
]


def _skewed(offset: str) -> list[str]:
    """A command prefix running a process with its wall clock moved by ``offset`` (monotonic untouched:
    Celery's and redis-py's timers keep working; see ``nerv_testtasks.slow_waiting`` for what breaks)."""
    return ["env", "FAKETIME_DONT_FAKE_MONOTONIC=1", str(shutil.which("faketime")), "-f", offset]


def _entries(c: Cluster, run_id: str) -> list[tuple[EventType, float, float, dict]]:
    """(type, writer's ts, logged time, data) of every event of a run."""
    # The logged time read from the entry id here, not from Event.logged_at: the check does not rest
    # on the code under test.
    return [
        (ev.type, ev.ts, int(eid.partition("-")[0]) / 1000, dict(ev.data))
        for eid, ev in c.client.log.read_run(run_id)
    ]


def test_a_worker_45s_behind_runs_a_task_with_a_20s_timeout_to_the_end(own_cluster: Cluster) -> None:
    c = own_cluster
    c.scheduler()
    c.wait_leader()
    c.worker("cpu", 1, wrapper=_skewed("-45s"))
    wf = Workflow("clock-behind")
    wf.add(tt.slow_waiting, 1.0, id="t", timeout=20)
    run_id = c.client.submit(wf)
    res = c.client.wait(run_id, timeout=60)
    events = _entries(c, run_id)
    started = next(e for e in events if e[0] is EventType.TASK_STARTED)
    assert started[2] - started[1] > 40, "the worker's clock is not behind: the test proves nothing"
    assert res.status is RunStatus.COMPLETED, f"{res.reason}: a worker's clock decided a timeout"
    assert res.tasks["t"].attempts == 1 and res.results == {"t": 1.0}
    assert c.execs(run_id) == {"t": 1}


def test_a_worker_an_hour_ahead_retries_within_seconds(own_cluster: Cluster) -> None:
    c = own_cluster
    c.scheduler()
    c.wait_leader()
    c.worker("cpu", 1, wrapper=_skewed("+1h"))
    wf = Workflow("clock-ahead")
    wf.add(tt.flaky, 2, id="t", retry=RetryPolicy(max_retries=2, backoff=0.5))
    run_id = c.client.submit(wf)
    try:
        res = c.client.wait(run_id, timeout=30)
    except WaitTimeoutError:
        pytest.fail("the retry was held back: its due time was taken from the worker's clock, an hour ahead")
    events = _entries(c, run_id)
    retrying = next(e for e in events if e[0] is EventType.TASK_RETRYING)
    assert retrying[3]["due_at"] - retrying[2] > 3000, (
        "the worker's clock is not ahead: the test proves nothing"
    )
    assert res.status is RunStatus.COMPLETED, res.reason
    assert res.results == {"t": 2} and res.tasks["t"].attempts == 2
    redispatched = [e for e in events if e[0] is EventType.TASK_DISPATCHED][1]
    waited = redispatched[2] - retrying[2]
    assert 0.4 <= waited < 10, f"attempt 2 was dispatched {waited:.2f}s after the failure (backoff 0.5 s)"
