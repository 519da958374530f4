"""A real scheduler process exports runs as OpenTelemetry traces over OTLP/HTTP (issue 12, part 7),
to a receiver in this test process, including the span of an attempt whose worker was SIGKILLed."""

from __future__ import annotations

import os
import signal
import time

import nerv_testtasks as tt
import pytest

from nerv_cluster import EventType, RunStatus, Workflow
from scheduler.tracing import attempt_span_id, run_span_id, trace_id_of
from tests.integration.cluster import Cluster
from tests.integration.dagcheck import log_of
from tests.integration.otlp import OtlpReceiver, ReceivedSpan

pytestmark = pytest.mark.timeout(90)

_OK, _ERROR = 1, 2


def _otel_env(rx: OtlpReceiver) -> dict[str, str]:
    # The standard variables only: the endpoint turns tracing on; a short export delay for the test.
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_SERVICE_NAME": "nerv-scheduler-test",
    }


def test_a_worker_sigkilled_mid_task_leaves_the_span_of_the_lost_attempt_and_of_the_retry(
    own_cluster: Cluster,
) -> None:
    c = own_cluster
    with OtlpReceiver() as rx:
        c.scheduler(**_otel_env(rx))
        c.wait_leader()
        c.worker("cpu", 1)
        c.worker("cpu", 1)
        wf = Workflow("traced")
        first = wf.add(tt.add, 1, 2, id="first")
        victim = wf.add(tt.slow, 1.0, id="victim", dependencies=[first])
        wf.add(tt.add, victim, 1, id="after")
        run_id = c.client.submit(wf)
        started = _wait_running(c, run_id, "victim")
        pid = int(started.data["worker"].split(":")[1])
        owner = next(p for p in c.procs if p.pid == os.getpgid(pid))
        c.kill(owner, signal.SIGKILL)  # the worker host dies mid-task: parent and pool child
        res = c.client.wait(run_id, timeout=60)
        assert res.status is RunStatus.COMPLETED, res.reason
        assert res.tasks["victim"].attempts == 2

        ids = {
            "run": run_span_id(run_id),
            "first": attempt_span_id(run_id, "first", 1),
            "lost": attempt_span_id(run_id, "victim", 1),
            "retry": attempt_span_id(run_id, "victim", 2),
            "after": attempt_span_id(run_id, "after", 1),
        }
        spans = rx.wait_for(lambda got: set(ids.values()) <= {s.span_id for s in got})

    by_id: dict[int, ReceivedSpan] = {s.span_id: s for s in spans}
    assert len(spans) == len(by_id) == 5, "one span per attempt and one for the run, each exported once"
    trace = trace_id_of(run_id)
    assert all(s.trace_id == trace for s in spans)
    assert all(s.service == "nerv-scheduler-test" for s in spans)
    run = by_id[ids["run"]]
    assert run.parent_id is None and run.name == "run traced" and run.status_code == _OK
    for key in ("first", "lost", "retry", "after"):
        span = by_id[ids[key]]
        assert span.parent_id == ids["run"]
        assert span.attributes["nerv.queue"] == "cpu"
        assert run.start_ns <= span.start_ns <= span.end_ns <= run.end_ns

    lost, retry = by_id[ids["lost"]], by_id[ids["retry"]]
    assert lost.name == retry.name == "nerv_testtasks.slow"
    assert lost.attributes["nerv.attempt"] == 1 and lost.attributes["nerv.status"] == "LOST"
    assert lost.attributes["nerv.worker"] == started.data["worker"], "the worker that died"
    assert lost.status_code == _ERROR
    assert retry.attributes["nerv.attempt"] == 2 and retry.attributes["nerv.status"] == "COMPLETED"
    assert retry.attributes["nerv.worker"] != started.data["worker"] and retry.status_code == _OK
    assert lost.end_ns <= retry.start_ns
    # Times are the events': the lost attempt ends at the watchdog's TASK_PENDING (the scheduler's own
    # event, on its clock, which is Redis's), the retry starts when its TASK_STARTED entered the log.
    events = log_of(c.client, run_id)
    pending = next(ev for ev in events if ev.type is EventType.TASK_PENDING)
    assert lost.end_ns == int(pending.ts * 1e9)
    restart = next(ev for ev in events if ev.type is EventType.TASK_STARTED and ev.attempt == 2)
    # (A hand-off claim is the scheduler's own event, seen before the log dated it.)
    if restart.source.startswith("scheduler:"):
        assert retry.start_ns == int(restart.ts * 1e9)
    else:
        # A worker's TASK_STARTED is dated when it entered the feed, where the leader read it; the
        # log's copy is the leader's transcription of it, one step later (issue 13: only the
        # scheduler writes run logs).
        assert restart.logged_at is not None
        assert 0 <= int(restart.logged_at * 1e9) - retry.start_ns < 200_000_000
    # Links: each attempt to the attempts of its dependencies that fed it.
    assert lost.links == retry.links == ((trace, ids["first"]),)
    assert by_id[ids["after"]].links == ((trace, ids["retry"]),)


def test_a_new_leader_ends_the_spans_the_dead_one_opened_with_the_same_ids_and_times(
    own_cluster: Cluster,
) -> None:
    c = own_cluster
    with OtlpReceiver() as rx:
        first = c.scheduler(**_otel_env(rx))
        c.wait_leader()
        c.worker("cpu", 1)
        wf = Workflow("failover")
        long = wf.add(tt.slow, 6.0, id="long")  # outlasts the takeover (lease TTL 2 s)
        wf.add(tt.add, long, 1, id="next")
        run_id = c.client.submit(wf)
        started = _wait_running(c, run_id, "long")
        c.kill(first, signal.SIGKILL)  # the leader dies while "long" runs: its span is open
        c.scheduler(**_otel_env(rx))  # the next leader takes over once the lease lapses
        res = c.client.wait(run_id, timeout=60)
        assert res.status is RunStatus.COMPLETED, res.reason
        assert res.tasks["long"].attempts == 1, "the attempt went on across the failover"
        ids = [run_span_id(run_id), attempt_span_id(run_id, "long", 1), attempt_span_id(run_id, "next", 1)]
        spans = rx.wait_for(lambda got: set(ids) <= {s.span_id for s in got})
    assert len(spans) == 3 and {s.trace_id for s in spans} == {trace_id_of(run_id)}
    by_id = {s.span_id: s for s in spans}
    run, span = by_id[ids[0]], by_id[ids[1]]
    # The new leader knew the open attempt only from the refolded log: the same start as the dead
    # leader had seen (the worker's TASK_STARTED as the log dated it), the run's from its submission.
    assert started.logged_at is not None and span.start_ns == int(started.logged_at * 1e9)
    submitted = log_of(c.client, run_id)[0]
    assert submitted.type is EventType.WORKFLOW_SUBMITTED and run.start_ns == int(submitted.ts * 1e9)
    assert (
        span.attributes["nerv.status"] == "COMPLETED"
        and span.attributes["nerv.worker"] == started.data["worker"]
    )
    assert span.parent_id == run.span_id and by_id[ids[2]].links == ((trace_id_of(run_id), ids[1]),)


def _wait_running(c: Cluster, run_id: str, task_id: str, timeout: float = 30):
    """The TASK_STARTED of ``task_id`` as logged, once its function itself runs (past the claim). The
    scheduler may hold the transcription for its next write (``TRANSCRIPT_HOLD_S``)."""
    deadline = time.monotonic() + timeout
    while True:
        if c.execs(run_id).get(task_id, 0) >= 1:
            for ev in log_of(c.client, run_id):
                if ev.type is EventType.TASK_STARTED and ev.task_id == task_id:
                    return ev
        assert time.monotonic() < deadline, f"{task_id} never started running"
        time.sleep(0.02)
