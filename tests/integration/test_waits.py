"""Durable waits (issue 11, part "waits") through real Redis, a real scheduler and real workers.

``wait_for`` nodes are WAITING in the scheduler's state (never dispatched to a worker) until their
signal comes; a signal sent first is kept; a timeout fails the node with TaskTimeoutError and a
``one_failed`` fallback runs; ``sleep``/``sleep_until`` are the scheduler's timers; all of it survives a
scheduler SIGKILL. Counters in Redis (``test:execs:<run>``) prove what ran, and how often.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import nerv_testtasks as tt
import pytest

from nerv_cluster import Client, Workflow
from nerv_cluster.errors import (
    PayloadTooLargeError,
    RunFinishedError,
    RunNotFoundError,
    SerializationError,
    UnknownSignalError,
)
from nerv_cluster.model import Event, EventType, RunStatus, TaskStatus
from tests.integration.cluster import Cluster


def _until(what: str, check: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _status(client: Client, run_id: str, tid: str) -> TaskStatus:
    return client.status(run_id).tasks[tid].status


def _logged(client: Client, run_id: str) -> list[Event]:
    """The run's events with their logged times (Redis's clock)."""
    return [ev for _, ev in client.log.read_run(run_id)]


def _first(events: list[Event], kind: EventType, tid: str | None = None) -> Event:
    return next(ev for ev in events if ev.type is kind and (tid is None or ev.task_id == tid))


def _never_dispatched(events: list[Event], tid: str) -> None:
    """The wait node held no worker slot: no job of it was ever dispatched or started."""
    kinds = {ev.type for ev in events if ev.task_id == tid}
    assert not kinds & {EventType.TASK_DISPATCHED, EventType.TASK_STARTED}, kinds


def _approval_workflow(name: str, timeout: float | None = 60) -> Workflow:
    wf = Workflow(name)
    approval = wf.wait_for("approval", timeout=timeout)
    wf.add(tt.deploy, approval, id="deploy")
    return wf


@pytest.mark.timeout(60)
def test_signal_after_the_node_is_reached_completes_it_with_the_payload(cluster: Cluster) -> None:
    c = cluster.client
    run_id = c.submit(_approval_workflow("wait-after"))
    _until("the approval node to wait", lambda: _status(c, run_id, "approval") is TaskStatus.WAITING)
    time.sleep(0.5)  # waiting for longer changes nothing: no worker runs anything meanwhile
    assert cluster.execs(run_id) == {}
    assert c.status(run_id).status is RunStatus.RUNNING
    assert c.signal(run_id, "approval", {"by": "ana"}) is True
    result = c.wait(run_id, timeout=30)
    assert result.status is RunStatus.COMPLETED, result.reason
    assert result.tasks["approval"].result == {"by": "ana"}
    assert result.results["deploy"] == {"deployed": True, "approval": {"by": "ana"}}
    assert cluster.execs(run_id) == {"deploy": 1}
    events = _logged(c, run_id)
    _never_dispatched(events, "approval")
    assert (
        _first(events, EventType.TASK_WAITING, "approval").logged_at
        < _first(events, EventType.SIGNAL_RECEIVED).logged_at
    )


@pytest.mark.timeout(60)
def test_a_signal_sent_before_the_node_is_reached_is_kept_until_it_is(cluster: Cluster) -> None:
    c = cluster.client
    wf = Workflow("wait-before")
    first = wf.add(tt.slow, 1.5, id="first")
    approval = wf.wait_for("approval", timeout=30, dependencies=[first])
    wf.add(tt.deploy, approval, id="deploy")
    run_id = c.submit(wf)
    assert c.signal(run_id, "approval", {"by": "early"}) is True
    # A second signal of the same name is logged but changes nothing: the first one is kept.
    assert c.signal(run_id, "approval", {"by": "late"}) is False
    result = c.wait(run_id, timeout=30)
    assert result.status is RunStatus.COMPLETED, result.reason
    assert result.results["deploy"]["approval"] == {"by": "early"}
    events = _logged(c, run_id)
    signalled = _first(events, EventType.SIGNAL_RECEIVED)
    reached = _first(events, EventType.TASK_WAITING, "approval")
    assert signalled.logged_at < reached.logged_at
    assert cluster.execs(run_id) == {"first": 1, "deploy": 1}


@pytest.mark.timeout(60)
def test_of_clients_racing_one_signal_exactly_one_is_told_it_was_first(cluster: Cluster) -> None:
    wf = _approval_workflow("wait-race")
    wf.add(tt.slow, 3.0, id="hold")  # the run outlives every signal: none may find it finished
    run_id = cluster.client.submit(wf)
    clients = [Client(settings=cluster.client.settings) for _ in range(8)]
    start = threading.Barrier(len(clients))
    answers: dict[int, bool] = {}

    def send(i: int) -> None:
        start.wait()
        answers[i] = clients[i].signal(run_id, "approval", {"by": i})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for client in clients:
        client.close()
    assert len(answers) == len(clients)
    firsts = [i for i, first in answers.items() if first]
    assert len(firsts) == 1, f"told first: {firsts}"
    result = cluster.client.wait(run_id, timeout=30)
    assert result.tasks["approval"].result == {"by": firsts[0]}, "the one told first is the one received"


@pytest.mark.timeout(60)
def test_a_timeout_fails_the_node_with_task_timeout_error_and_the_fallback_runs(cluster: Cluster) -> None:
    c = cluster.client
    wf = _approval_workflow("wait-timeout", timeout=1.0)
    wf.add(tt.counted_io, dependencies=["approval"], trigger="one_failed", id="fallback")
    run_id = c.submit(wf)
    result = c.wait(run_id, timeout=30)
    # The fallback handled the failure: the run completes; deploy could never run.
    assert result.status is RunStatus.COMPLETED, result.reason
    approval = result.tasks["approval"]
    assert approval.status is TaskStatus.FAILED
    assert approval.error is not None and approval.error.type == "TaskTimeoutError"
    assert result.tasks["deploy"].status is TaskStatus.SKIPPED
    assert result.tasks["fallback"].status is TaskStatus.COMPLETED
    assert cluster.execs(run_id) == {"fallback": 1}
    events = _logged(c, run_id)
    waited = (
        _first(events, EventType.TASK_FAILED, "approval").logged_at
        - _first(events, EventType.TASK_WAITING, "approval").logged_at
    )
    assert 1.0 <= waited < 3.0, waited
    # A signal after the run ended is refused, and nothing is written.
    with pytest.raises(RunFinishedError):
        c.signal(run_id, "approval", {"by": "too late"})
    assert not [ev for ev in _logged(c, run_id) if ev.type is EventType.SIGNAL_RECEIVED]


@pytest.mark.timeout(60)
def test_sleep_and_sleep_until_are_durable_timers(cluster: Cluster) -> None:
    c = cluster.client
    wf = Workflow("wait-sleep")
    nap = wf.sleep(1.0, id="nap")
    wf.add(tt.counted_io, dependencies=[nap], id="after-nap")
    until = time.time() + 1.5
    alarm = wf.sleep_until(until, id="alarm")
    wf.add(tt.counted_io, dependencies=[alarm], id="after-alarm")
    run_id = c.submit(wf)
    result = c.wait(run_id, timeout=30)
    assert result.status is RunStatus.COMPLETED, result.reason
    assert cluster.execs(run_id) == {"after-nap": 1, "after-alarm": 1}
    events = _logged(c, run_id)
    for tid in ("nap", "alarm"):
        _never_dispatched(events, tid)
    nap_for = (
        _first(events, EventType.TASK_COMPLETED, "nap").logged_at
        - _first(events, EventType.TASK_WAITING, "nap").logged_at
    )
    assert 1.0 <= nap_for < 3.0, nap_for
    woke = _first(events, EventType.TASK_COMPLETED, "alarm").logged_at
    assert until - 0.05 <= woke < until + 2.0  # Redis's clock vs this host's


@pytest.mark.timeout(60)
def test_bad_signals_get_clear_errors_and_write_nothing(cluster: Cluster) -> None:
    c = cluster.client
    with pytest.raises(RunNotFoundError):
        c.signal("no-such-run-0123", "approval", {})
    run_id = c.submit(_approval_workflow("wait-bad"))
    with pytest.raises(UnknownSignalError, match="it waits for: approval"):
        c.signal(run_id, "aproval", {})
    with pytest.raises(SerializationError):
        c.signal(run_id, "approval", {"when": object()})
    with pytest.raises(SerializationError):
        c.signal(run_id, "approval", float("nan"))
    with pytest.raises(PayloadTooLargeError, match="NERV_MAX_SIGNAL_BYTES"):
        c.signal(run_id, "approval", "x" * (c.settings.max_signal_bytes + 1))
    assert not [ev for ev in _logged(c, run_id) if ev.type is EventType.SIGNAL_RECEIVED]
    # The CLI: a bad name is one red line and exit 2; a good signal completes the run.
    nerv = [sys.executable, "-m", "nerv_cluster", "signal", run_id]
    env = {**cluster.env}
    bad = subprocess.run([*nerv, "nope"], env=env, capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "no wait_for node" in bad.stdout + bad.stderr
    ok = subprocess.run(
        [*nerv, "approval", "--data", json.dumps({"by": "cli"})],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    result = c.wait(run_id, timeout=30)
    assert result.results["deploy"]["approval"] == {"by": "cli"}


@pytest.mark.timeout(60)
def test_cancelling_a_run_cancels_its_waiting_node(cluster: Cluster) -> None:
    c = cluster.client
    run_id = c.submit(_approval_workflow("wait-cancel", timeout=None))
    _until("the approval node to wait", lambda: _status(c, run_id, "approval") is TaskStatus.WAITING)
    c.cancel(run_id)
    result = c.wait(run_id, timeout=30)
    assert result.status is RunStatus.CANCELLED
    assert result.tasks["approval"].status is TaskStatus.CANCELLED
    assert cluster.execs(run_id) == {}


@pytest.mark.timeout(120)
def test_waits_survive_a_scheduler_sigkill(own_cluster: Cluster) -> None:
    c = own_cluster
    sched = c.scheduler()
    c.wait_leader()
    c.worker("io", 2)
    wf = _approval_workflow("wait-restart", timeout=None)
    never = wf.wait_for("never", timeout=4.0)
    wf.add(tt.counted_io, dependencies=[never], trigger="one_failed", id="fallback")
    nap = wf.sleep(3.0, id="nap")
    wf.add(tt.counted_io, dependencies=[nap], id="after-nap")
    run_id = c.client.submit(wf)
    _until(
        "every wait node to wait",
        lambda: all(_status(c.client, run_id, t) is TaskStatus.WAITING for t in ("approval", "never", "nap")),
    )
    c.kill(sched, signal.SIGKILL)
    killed_at = time.time()
    # Sent while no scheduler runs: it waits in the intake; the new leader refolds the run, applies the
    # signal and answers the client, still waiting.
    with ThreadPoolExecutor(1) as pool:
        sent = pool.submit(c.client.signal, run_id, "approval", {"by": "ana"})
        deadline = time.monotonic() + 10
        while not c.redis.xlen(c.client.keys.intake) and time.monotonic() < deadline:
            time.sleep(0.02)
        c.scheduler()
        assert sent.result(timeout=30) is True
    result = c.client.wait(run_id, timeout=60)
    assert result.status is RunStatus.COMPLETED, result.reason
    assert result.results["deploy"] == {"deployed": True, "approval": {"by": "ana"}}
    assert result.tasks["never"].status is TaskStatus.FAILED
    assert result.tasks["never"].error.type == "TaskTimeoutError"
    assert c.execs(run_id) == {"deploy": 1, "fallback": 1, "after-nap": 1}
    events = _logged(c.client, run_id)
    # The deadlines are the logged ones, kept across the restart (not restarted from the new leader).
    for tid, kind, seconds in (("nap", EventType.TASK_COMPLETED, 3.0), ("never", EventType.TASK_FAILED, 4.0)):
        waited = _first(events, kind, tid).logged_at - _first(events, EventType.TASK_WAITING, tid).logged_at
        assert seconds <= waited < seconds + 3.0, (tid, waited)
    # Each node ended once, by the one leader that held it (none twice across the failover).
    for tid in ("approval", "never", "nap"):
        ends = [
            ev
            for ev in events
            if ev.task_id == tid and ev.type in (EventType.TASK_COMPLETED, EventType.TASK_FAILED)
        ]
        assert len(ends) == 1, (tid, ends)
        assert len([ev for ev in events if ev.task_id == tid and ev.type is EventType.TASK_WAITING]) == 1
    assert time.time() - killed_at < 30
