"""Bounds on what anyone can make the cluster hold (issue 10, point 9), and the loop-progress rule of
the lease (point 1): the pure parts."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from nerv_cluster import Client, Settings, Workflow
from nerv_cluster.bus import EventBus
from nerv_cluster.errors import PayloadTooLargeError
from nerv_cluster.eventlog import fresh_capacity, fresh_registry
from nerv_cluster.jobs import Job
from nerv_cluster.model import Event, EventType, TaskError, truncate
from nerv_cluster.registry import Registry, task
from nerv_cluster.signing import Signer
from scheduler.dispatch import Dispatcher, unsendable_events
from scheduler.lease import Lease, LoopProgress

# -- TaskError ---------------------------------------------------------------------------------------------


def test_truncate_keeps_short_text_and_cuts_long_text_with_a_marker_saying_how_much() -> None:
    assert truncate("short", 10) == "short"
    text = "head" + "x" * 10_000 + "tail"
    cut = truncate(text, 500)
    assert len(cut) == 500
    assert cut.startswith("head") and cut.endswith("tail")
    kept = len(cut) - len(cut.split("\n")[1]) - 2
    assert f"[{len(text) - kept} characters cut]" in cut


def test_task_error_bounds_message_and_traceback() -> None:
    from nerv_cluster import constants

    err = TaskError.from_exception(ValueError("m" * 100_000), "t" * 1_000_000)
    assert len(err.message) == constants.MAX_ERROR_MESSAGE_CHARS
    assert len(err.traceback) == constants.MAX_TRACEBACK_CHARS
    assert "characters cut" in err.message and "characters cut" in err.traceback
    assert TaskError.from_exception(ValueError("small")).message == "small"


# -- the client bus history --------------------------------------------------------------------------------


def _event(i: int, size: int) -> Event:
    return Event(EventType.TASK_COMPLETED, "r", f"t{i}", 1, {"result": "x" * size}, ts=1.0, id=f"e{i}")


def test_bus_history_is_bounded_by_bytes_as_well_as_count() -> None:
    bus = EventBus(history_limit=1_000, history_bytes=5_000)
    for i in range(50):
        bus.publish(_event(i, 1_000))
    kept = bus.history()
    assert 0 < len(kept) <= 5
    assert [e.task_id for e in kept] == [f"t{i}" for i in range(50 - len(kept), 50)]
    assert bus.history_size == sum(len(e.to_json()) for e in kept) <= 5_000
    bus.publish(_event(99, 10_000))  # bigger than the whole bound: not kept, and nothing else either
    assert bus.history() == [] and bus.history_size == 0


# -- submissions -------------------------------------------------------------------------------------------


def test_client_refuses_a_submission_over_the_bound_before_writing() -> None:
    client = Client(settings=Settings(redis_url="redis://127.0.0.1:1/0", max_submission_bytes=2_000))
    reg = Registry()
    noop = task(name="t.noop", registry=reg)(lambda *a: None)
    wf = Workflow("w", registry=reg)
    for i in range(40):
        wf.add(noop, "y" * 50, id=f"t{i}")
    with pytest.raises(PayloadTooLargeError, match=r"bytes of JSON; the limit is 2000"):
        client.submit(wf, check_names=False)


# -- capacity and registry entries -------------------------------------------------------------------------


def test_fresh_capacity_counts_recent_nodes_and_names_stale_and_unreadable_ones() -> None:
    raws = {
        "n1": json.dumps({"queues": ["cpu"], "concurrency": 2, "at": 100.0}),
        "n2": json.dumps({"queues": ["cpu", "io"], "concurrency": 4, "at": 95.0}),
        "old": json.dumps({"queues": ["cpu"], "concurrency": 8, "at": 10.0}),
        "junk": "{",
    }
    counts, stale = fresh_capacity(raws, fresh_since=90.0)
    assert counts == {"cpu": 6, "io": 4}
    assert sorted(stale) == ["junk", "old"]


def test_fresh_registry_keeps_refreshed_names_and_names_the_rest() -> None:
    names = {"a": "cpu", "b": "io", "never": "cpu"}
    seen = {"a": "100.5", "b": "10.0", "orphan": "100.0"}
    live, stale = fresh_registry(names, seen, fresh_since=50.0)
    assert live == {"a": "cpu"}
    assert stale == ["b", "never", "orphan"]


# -- the loop's progress, for the lease --------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_loop_that_refolds_and_fails_again_and_again_is_stalled() -> None:
    clock = _Clock()
    p = LoopProgress(clock)
    p.acquired()
    for _ in range(20):  # refold, then the step raises; 0.5 s of back-off each time
        p.refold_started()
        clock.now += 0.2
        p.refold_tick()
        p.refold_done()
        clock.now += 0.5
    assert p.stalled_for() >= 20 * 0.7 - 0.2 - 1e-9


def test_a_long_refold_that_moves_is_progress_and_steps_are_progress() -> None:
    clock = _Clock()
    p = LoopProgress(clock)
    p.acquired()
    p.refold_started()
    for _ in range(100):  # 100 s of refold, one run a second
        clock.now += 1.0
        p.refold_tick()
        assert p.stalled_for() <= 1.0
    p.refold_done()
    clock.now += 2.0
    assert p.stalled_for() == 2.0
    p.step_done()
    assert p.stalled_for() == 0.0
    clock.now += 3.0
    assert p.stalled_for() == 3.0
    # After a completed step, the next refold (a Redis error) counts again.
    p.refold_started()
    clock.now += 1.0
    p.refold_tick()
    assert p.stalled_for() == 0.0


def test_a_lease_held_off_is_not_acquired() -> None:
    lease = Lease(log=None, ttl_ms=1_000)  # type: ignore[arg-type]  # never reached while held off
    lease.hold_off(60)
    assert lease.acquire() is False


# -- the dispatcher ----------------------------------------------------------------------------------------


class _Producer:
    def batch(self, max_size: int) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


class _App:
    """Just enough of a Celery app: send_task refuses some task ids, or loses the connection."""

    def __init__(self, refuse: set[str], connection_lost: bool = False) -> None:
        self.refuse = refuse
        self.connection_lost = connection_lost
        self.sent: list[str] = []

    @contextlib.contextmanager
    def producer_or_acquire(self) -> Iterator[_Producer]:
        yield _Producer()

    def connection_for_write(self) -> Any:
        class _C:
            connection_errors = (redis.ConnectionError,)

        return _C()

    def send_task(self, name: str, *, task_id: str, **_: Any) -> None:
        if self.connection_lost:
            raise redis.ConnectionError("broker away")
        if task_id in self.refuse:
            raise ValueError(f"message {task_id} over the broker's size")
        self.sent.append(task_id)


def _job(tid: str) -> Job:
    return Job(run_id="r", task_id=tid, attempt=1, fn="t.noop", args=[], kwargs={})


def _dispatcher(app: _App) -> Dispatcher:
    """A dispatcher sealing jobs as a leader does (the scheduler sets ``seal`` for each term)."""
    d = Dispatcher(app)  # type: ignore[arg-type]
    signer = Signer(b"test key")
    d.seal = lambda job: job.to_wire(signer, "tok")
    return d


def test_a_message_the_broker_refuses_is_reported_and_the_others_still_go() -> None:
    app = _App(refuse={"r:b:1"})
    messages = [([_job("a")], "cpu"), ([_job("b"), _job("c")], "cpu"), ([_job("d")], "io")]
    refused = _dispatcher(app).send(messages)
    assert app.sent == ["r:a:1", "r:d:1"]
    assert [([j.task_id for j in jobs], q) for jobs, q, _ in refused] == [(["b", "c"], "cpu")]
    assert "over the broker's size" in refused[0][2]
    events = unsendable_events(refused, 5.0, "scheduler:1")
    assert [(e.type, e.task_id, e.attempt) for e in events] == [
        (EventType.TASK_FAILED, "b", 1),
        (EventType.TASK_FAILED, "c", 1),
    ]
    assert "refused the job's message on queue 'cpu'" in events[0].data["error"]["message"]


def test_a_lost_broker_connection_still_raises_so_every_job_is_kept_and_sent_again() -> None:
    app = _App(refuse=set(), connection_lost=True)
    with pytest.raises(redis.ConnectionError):
        _dispatcher(app).send([([_job("a")], "cpu")])
