"""What a worker process holds and says in its heartbeat, and what the watchdog concludes from it."""

from __future__ import annotations

import json
import threading

from nerv_cluster import constants
from nerv_cluster.jobs import job_id
from nerv_cluster.model import EventType
from nerv_cluster.settings import Settings
from nerv_cluster.state import RunState, State, fold
from scheduler.consumers import Consumers, queued_on, registered_queues
from scheduler.watchdog import Watchdog, held_by
from tests.unit.helpers import RUN, ev, run_of, submitted, td, wdef
from worker.heartbeat import beat_value
from worker.held import HeldAttempts

E = EventType
SOURCE = "scheduler:7"


def _running(*tids: str, worker: str = "w1") -> RunState:
    """A run whose tasks ``tids`` are RUNNING on ``worker`` (attempt 1)."""
    events = [submitted(wdef(*(td(t) for t in tids)))]
    for t in tids:
        events += [ev(E.TASK_DISPATCHED, t, 1, queue="cpu"), ev(E.TASK_STARTED, t, 1, worker=worker)]
    return run_of(fold(events))


def _watchdog() -> Watchdog:
    # judge() does no I/O: no event log needed.
    return Watchdog(None, Settings(max_redeliveries=3))  # type: ignore[arg-type]


def test_held_attempts_refuse_a_second_copy_until_released():
    held = HeldAttempts()
    assert held.acquire("r:a:1")
    assert not held.acquire("r:a:1"), "a second copy of a held attempt must be refused"
    held.add("r:b:1")
    assert held.snapshot() == ["r:a:1", "r:b:1"] and "r:a:1" in held and len(held) == 2
    held.release(["r:a:1", "not-held"])
    assert held.acquire("r:a:1")


def test_held_attempts_check_and_add_is_atomic_across_threads():
    held = HeldAttempts()
    wins: list[bool] = []
    barrier = threading.Barrier(8)

    def grab() -> None:
        barrier.wait()
        wins.append(held.acquire("r:t:1"))

    threads = [threading.Thread(target=grab) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wins.count(True) == 1


def test_heartbeat_value_lists_held_attempts_and_queues():
    value = beat_value(["r:a:1"], ["cpu"])
    assert json.loads(value) == {"held": ["r:a:1"], "queues": ["cpu"]}
    assert held_by(value) == frozenset({"r:a:1"})
    assert held_by(None) is None
    assert held_by("1") is None, "an old worker's value says nothing about attempts"
    assert held_by("{not json") is None


def test_unlisted_attempt_of_a_live_worker_is_redispatched_after_the_grace():
    run = _running("a", "b")
    wd = _watchdog()
    by_worker = {"w1": [(run, "a"), (run, "b")]}
    only_b = beat_value([job_id(RUN, "b", 1)], ["cpu"])
    t0 = 1000.0
    # A heartbeat written before the claim: "a" is not listed yet. No verdict within the grace...
    assert wd.judge(by_worker, {"w1": only_b}, t0, SOURCE) == []
    assert wd.judge(by_worker, {"w1": only_b}, t0 + constants.UNHELD_GRACE_S - 0.1, SOURCE) == []
    # ...and being listed again resets the clock.
    both = beat_value([job_id(RUN, "a", 1), job_id(RUN, "b", 1)], ["cpu"])
    assert wd.judge(by_worker, {"w1": both}, t0 + constants.UNHELD_GRACE_S, SOURCE) == []
    t1 = t0 + 10
    assert wd.judge(by_worker, {"w1": only_b}, t1, SOURCE) == []
    verdicts = wd.judge(by_worker, {"w1": only_b}, t1 + constants.UNHELD_GRACE_S, SOURCE)
    assert [(v.task_id, v.event.type, v.lost) for v in verdicts] == [("a", E.TASK_PENDING, True)]
    assert verdicts[0].event.data["next_attempt"] == 2
    assert "no longer holds" in verdicts[0].event.data["reason"]


def test_unheld_redispatch_counts_towards_the_poison_bound():
    events = [submitted(wdef(td("a")))]
    for attempt in (1, 2, 3):
        events += [
            ev(E.TASK_DISPATCHED, "a", attempt, queue="cpu"),
            ev(E.TASK_STARTED, "a", attempt, worker="w1"),
        ]
        if attempt < 3:
            events.append(ev(E.TASK_PENDING, "a", attempt, next_attempt=attempt + 1, reason="unheld"))
    run = run_of(fold(events))
    assert run.tasks["a"].lost == 2
    wd = _watchdog()
    nothing = beat_value([], ["cpu"])
    wd.judge({"w1": [(run, "a")]}, {"w1": nothing}, 0.0, SOURCE)
    (verdict,) = wd.judge({"w1": [(run, "a")]}, {"w1": nothing}, constants.UNHELD_GRACE_S, SOURCE)
    assert verdict.event.type is E.TASK_FAILED and verdict.event.data["error"]["type"] == "WorkerLostError"


def test_missing_heartbeat_still_means_a_lost_worker_and_old_values_are_trusted():
    run = _running("a")
    wd = _watchdog()
    by_worker = {"w1": [(run, "a")]}
    assert wd.judge(by_worker, {"w1": None}, 0.0, SOURCE) == []
    (v,) = wd.judge(by_worker, {"w1": None}, constants.LOST_WORKER_GRACE_S, SOURCE)
    assert "was lost" in v.event.data["reason"]
    wd2 = _watchdog()
    assert wd2.judge(by_worker, {"w1": "1"}, 0.0, SOURCE) == []
    assert wd2.judge(by_worker, {"w1": "1"}, 100.0, SOURCE) == []


def _queued(queue_of: dict[str, str]) -> State:
    events = [submitted(wdef(*(td(t, queue=q) for t, q in queue_of.items())))]
    events += [ev(E.TASK_DISPATCHED, t, 1, queue=q) for t, q in queue_of.items()]
    return fold(events)


def test_a_lost_consumer_resends_only_the_queued_jobs_of_its_queues():
    state = _queued({"c1": "cpu", "c2": "cpu", "i1": "io"})
    assert sorted(j.task_id for j, _ in queued_on(state, ["io"])) == ["i1"]
    assert sorted(j.task_id for j, _ in queued_on(state, ["cpu"])) == ["c1", "c2"]
    assert queued_on(state, []) == []


def test_consumers_are_lost_after_the_grace_and_only_when_registered():
    c = Consumers(None)  # type: ignore[arg-type]
    reg = {"A": json.dumps({"queues": ["cpu"], "node": "n", "pid": 1}), "B": json.dumps({"queues": ["io"]})}
    assert c.judge(reg, {"A": False, "B": True}, 0.0) == {}
    assert c.judge(reg, {"A": True, "B": True}, 1.0) == {}, "a beat again resets the clock"
    assert c.judge(reg, {"A": False, "B": True}, 2.0) == {}
    assert c.judge(reg, {"A": False, "B": True}, 2.0 + constants.LOST_WORKER_GRACE_S) == {"A": ["cpu"]}
    assert registered_queues("garbage") == [] and registered_queues('{"queues": "cpu"}') == []


def test_redis_retries_is_a_setting():
    assert Settings.from_env({}).redis_retries == constants.REDIS_RETRIES
    assert Settings.from_env({"NERV_REDIS_RETRIES": "2"}).redis_retries == 2


def test_a_worker_lost_holding_a_batch_claimed_attempt_is_not_counted_and_the_next_runs_alone():
    from scheduler.watchdog import lost

    events = [submitted(wdef(td("a"), td("b")))]
    events += [ev(E.TASK_DISPATCHED, "a", 1, queue="cpu"), ev(E.TASK_DISPATCHED, "b", 1, queue="cpu")]
    events += [ev(E.TASK_STARTED, "a", 1, worker="w1", batch=True), ev(E.TASK_STARTED, "b", 1, worker="w1")]
    run = run_of(fold(events))
    assert run.tasks["a"].batch and not run.tasks["b"].batch
    settings = Settings(max_redeliveries=1)  # one counted loss fails a task
    va, vb = lost(run, "a", settings, 10.0, SOURCE), lost(run, "b", settings, 10.0, SOURCE)
    assert va.event.type is E.TASK_PENDING and va.event.data["counted"] is False
    assert vb.event.type is E.TASK_FAILED, "a loss of an attempt claimed alone is its own"
    after = run_of(fold([va.event], State(runs=fold(events).runs)))
    assert after.tasks["a"].lost == 0 and after.tasks["a"].attempt == 2


def test_a_takeover_of_a_batch_claimed_attempt_counts_no_loss():
    events = [submitted(wdef(td("a"))), ev(E.TASK_DISPATCHED, "a", 1, queue="cpu")]
    events += [ev(E.TASK_STARTED, "a", 1, worker="w1", batch=True, ts=1.0)]
    events += [ev(E.TASK_STARTED, "a", 1, worker="w2", ts=2.0)]  # w1 died; w2 claims it alone
    ts = run_of(fold(events)).tasks["a"]
    assert (ts.worker, ts.lost, ts.batch) == ("w2", 0, False)
    events += [ev(E.TASK_STARTED, "a", 1, worker="w3", ts=3.0)]  # w2, claimed alone, died: counted
    assert run_of(fold(events)).tasks["a"].lost == 1
