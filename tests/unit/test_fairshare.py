"""Fair share and run priority (issue 11, part 3): turns, lanes, the in-flight count, the metered outbox.

Pure: no Redis (the outbox sends through a recording dispatcher).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from nerv_cluster import constants
from nerv_cluster.errors import ConfigurationError, WorkflowError
from nerv_cluster.fairshare import (
    DEFAULT_SHARE,
    FairQueue,
    InFlight,
    Share,
    Turns,
    budget,
    parse_weights,
    run_meta,
    share_of,
)
from nerv_cluster.jobs import Job
from nerv_cluster.model import Event, EventType, TaskPriority
from nerv_cluster.settings import Settings
from scheduler.dispatch import Outbox


def _job(run: str, i: int, family: str = "", attempt: int = 1) -> Job:
    return Job(run_id=run, task_id=f"t{i}", attempt=attempt, fn="m.f", args=[], kwargs={}, family=family)


def _ok(job: Job) -> bool:
    return True


def _runs(jobs: list[Job]) -> str:
    return "".join(job.run_id for job in jobs)


# -- turns ---------------------------------------------------------------------------------------------


def test_turns_serve_lanes_in_proportion_to_their_weights():
    turns = Turns()
    weights = {"a": 1.0, "b": 3.0}
    for name in weights:
        turns.join(name)
    served: Counter[str] = Counter()
    for _ in range(400):
        lane = turns.peek()
        assert lane is not None
        served[lane] += 1
        turns.charge(lane, 1, weights[lane])
    assert served["b"] == 3 * served["a"]


def test_a_lane_back_from_idle_gets_no_credit_for_its_idle_time():
    turns = Turns()
    turns.join("a")
    for _ in range(100):
        turns.charge("a", 1, 1.0)
    turns.join("b")  # starts at the current pass, not at 0: it does not get 100 turns in a row
    served = []
    for _ in range(6):
        lane = turns.peek()
        assert lane is not None
        served.append(lane)
        turns.charge(lane, 1, 1.0)
    assert served.count("a") >= 2 and served.count("b") >= 2


# -- lanes ---------------------------------------------------------------------------------------------


def test_a_small_run_behind_a_big_one_goes_in_the_next_turn():
    fq = FairQueue()
    for i in range(20_000):
        fq.push(_job("B", i), DEFAULT_SHARE)
    first = fq.take(64, _ok)
    for i in range(3):
        fq.push(_job("s", i), DEFAULT_SHARE)
    second = fq.take(64, _ok)
    assert _runs(first) == "B" * 64
    assert "sss" in _runs(second), "the small run's 3 jobs go within one round"
    assert len(fq) == 20_000 + 3 - 128


def test_alone_a_lane_takes_the_whole_budget_in_one_turn():
    fq = FairQueue()
    for i in range(1000):
        fq.push(_job("B", i), DEFAULT_SHARE)
    got = fq.take(500, _ok)
    assert [j.task_id for j in got] == [f"t{i}" for i in range(500)], "the run's own order is kept"


def test_a_high_priority_run_gets_four_times_the_turns_of_a_medium_one():
    fq = FairQueue()
    high = share_of(run_meta("high", None), {})
    for i in range(5000):
        fq.push(_job("m", i), DEFAULT_SHARE)
        fq.push(_job("h", i), high)
    got = Counter(_runs(fq.take(2000, _ok)))
    assert got["h"] == pytest.approx(4 * got["m"], rel=0.05)


def test_tenants_share_by_weight_whatever_their_number_of_runs():
    weights = parse_weights(["a=3", "b=1"])
    fq = FairQueue()
    a, b = share_of(run_meta(None, "a"), weights), share_of(run_meta(None, "b"), weights)
    for i in range(3000):
        fq.push(_job("x", i), a)
        for run in "uvw":  # tenant b has three runs: together they still get b's share
            fq.push(_job(run, i), b)
    got = Counter(_runs(fq.take(4000, _ok)))
    assert got["x"] == pytest.approx(3 * (got["u"] + got["v"] + got["w"]), rel=0.05)
    assert got["u"] == pytest.approx(got["v"], abs=constants.FAIR_QUANTUM)


def test_child_runs_share_their_root_runs_lane():
    fq = FairQueue()
    for i in range(100):
        fq.push(_job(f"child{i}", 0, family="root"), DEFAULT_SHARE)
    fq.push(_job("other", 0), DEFAULT_SHARE)
    assert fq.lanes() == 2
    got = fq.take(40, _ok)
    assert "other" in {j.run_id for j in got}


def test_jobs_no_longer_valid_are_dropped_and_cost_no_budget():
    fq = FairQueue()
    for i in range(10):
        fq.push(_job("gone", i), DEFAULT_SHARE)
    for i in range(10):
        fq.push(_job("live", i), DEFAULT_SHARE)
    got = fq.take(5, lambda job: job.run_id == "live")
    assert _runs(got) == "live" * 5
    fq.forget("live")
    assert len(fq) == 0 and fq.lanes() == 0 and fq.take(5, _ok) == []


# -- submit's arguments and the weights ----------------------------------------------------------------


def test_run_meta_checks_priority_and_tenant():
    assert run_meta(None, None) == {}
    assert run_meta("high", "team-a") == {"priority": "HIGH", "tenant": "team-a"}
    with pytest.raises(WorkflowError):
        run_meta("urgent", None)
    with pytest.raises(WorkflowError):
        run_meta(None, "")
    with pytest.raises(WorkflowError):
        run_meta(None, 7)
    garbled = share_of({"priority": "nope", "tenant": 3}, {})
    assert garbled == DEFAULT_SHARE, "a run whose meta is garbled still runs, at the default share"
    assert share_of({"priority": "LOW"}, {}).weight == constants.RUN_PRIORITY_WEIGHTS[TaskPriority.LOW]


def test_tenant_weights_come_from_the_settings_and_bad_ones_fail_at_start():
    settings = Settings.from_env({"NERV_TENANT_WEIGHTS": "team-a=3, team-b=0.5"})
    assert settings.weights() == {"team-a": 3.0, "team-b": 0.5}
    for bad in ("team-a", "team-a=0", "=2", "team-a=x"):
        with pytest.raises(ConfigurationError):
            Settings.from_env({"NERV_TENANT_WEIGHTS": bad})
    with pytest.raises(ConfigurationError):
        Settings(fair_jobs_per_slot=-1)


# -- in flight -----------------------------------------------------------------------------------------


def _ev(kind: EventType, run: str, i: int, attempt: int = 1) -> Event:
    return Event(kind, run, f"t{i}", attempt)


def test_in_flight_counts_jobs_from_their_send_to_their_start():
    flight = InFlight()
    flight.sent([(_job("r", i), "cpu") for i in range(10)] + [(_job("r", 99), "io")])
    assert flight.count == {"cpu": 10, "io": 1}
    flight.observe([_ev(EventType.TASK_STARTED, "r", i) for i in range(4)])
    flight.observe([_ev(EventType.TASK_DISPATCHED, "r", 5), _ev(EventType.TASK_STARTED, "x", 6)])
    assert flight.count["cpu"] == 6
    flight.observe([_ev(EventType.TASK_STARTED, "r", 4, attempt=0)])  # an older attempt's: not this one
    assert flight.count["cpu"] == 6
    flight.sent([(_job("r", 5), "cpu")])  # the same job sent twice counts once
    assert flight.count["cpu"] == 6
    flight.unsent([(_job("r", 5), "cpu")])  # to be sent again (a lost worker's prefetch)
    assert flight.count["cpu"] == 5
    flight.reconcile(lambda run, task, attempt: task != "t6")
    assert flight.count["cpu"] == 4 and len(flight) == 5
    flight.clear()
    assert len(flight) == 0


def test_budget_refills_a_queue_to_a_round_per_slot_once_it_is_down_to_half():
    assert budget(0, 4, 128) == 512
    assert budget(256, 4, 128) == 256
    assert budget(257, 4, 128) == 0, "not yet: a refill carries several messages, not one"
    assert budget(900, 4, 128) == 0
    assert budget(0, 0, 128) == 128, "no worker announced yet: one slot's worth"


# -- the metered outbox --------------------------------------------------------------------------------


class RecordingDispatcher:
    """Records each send's messages; can refuse with a connection error."""

    def __init__(self) -> None:
        self.sends: list[list[tuple[list[Job], str]]] = []
        self.down = False

    def send(self, messages: Any) -> list[Any]:
        if self.down:
            raise ConnectionError("broker down")
        self.sends.append(list(messages))
        return []


def _outbox(jobs_per_slot: int = 128, share: Any = None) -> tuple[Outbox, RecordingDispatcher]:
    dispatcher = RecordingDispatcher()
    outbox = Outbox(None, dispatcher, lambda jobs: None, (), jobs_per_slot, share)  # type: ignore[arg-type]
    outbox.capacity = {"cpu": 2}
    return outbox, dispatcher


def _sent(dispatcher: RecordingDispatcher, index: int = -1) -> list[Job]:
    return [job for message, _ in dispatcher.sends[index] for job in message]


def test_the_outbox_meters_a_queue_to_its_budget_and_refills_as_workers_start_jobs():
    outbox, dispatcher = _outbox()
    outbox.add((_job("B", i), "cpu") for i in range(20_000))
    outbox.flush()
    first = dispatcher.sends[-1]
    assert sum(len(m) for m, _ in first) == 256
    assert {len(m) for m, _ in first} == {constants.MAX_BATCH}, "full messages: sized for the backlog"
    assert not outbox, "nothing to send until workers start jobs"
    outbox.flush()
    assert len(dispatcher.sends) == 1
    outbox.add((_job("s", i), "cpu") for i in range(3))
    outbox.observe(_ev(EventType.TASK_STARTED, "B", i) for i in range(32))  # a worker claimed a batch
    assert not outbox, "a refill waits for the queue to be down to half a round"
    outbox.observe(_ev(EventType.TASK_STARTED, "B", i) for i in range(32, 128))
    assert outbox
    outbox.flush()
    assert _runs(_sent(dispatcher)) == "sss" + "B" * 125, "the small run's turn came first"
    assert outbox.waiting() == 20_000 - 256 - 125


def test_a_failed_send_keeps_its_jobs_and_they_go_first_next_time():
    outbox, dispatcher = _outbox()
    outbox.add((_job("B", i), "cpu") for i in range(300))
    dispatcher.down = True
    with pytest.raises(ConnectionError):
        outbox.flush()
    assert outbox.in_flight.count.get("cpu", 0) == 0
    dispatcher.down = False
    outbox.flush()
    assert len(_sent(dispatcher)) == 256 and outbox.in_flight.count["cpu"] == 256


def test_limited_tasks_and_metering_off_go_unmetered():
    outbox, dispatcher = _outbox(share=lambda job: None)
    outbox.add((_job("B", i), "cpu") for i in range(1000))
    outbox.flush()
    assert len(_sent(dispatcher)) == 1000
    outbox, dispatcher = _outbox(jobs_per_slot=0)
    outbox.capacity = {}  # (with a capacity, a deep backlog would ask Redis whether to hold them)
    outbox.add((_job("B", i), "cpu") for i in range(1000))
    outbox.flush()
    assert len(_sent(dispatcher)) == 1000


def test_jobs_added_again_stop_counting_so_a_resend_never_waits_on_itself():
    outbox, dispatcher = _outbox()
    jobs = [(_job("B", i), "cpu") for i in range(256)]
    outbox.add(jobs)
    outbox.flush()
    assert outbox.in_flight.count["cpu"] == 256
    outbox.add(jobs)  # a dead worker's prefetch, resent: its jobs leave the count until sent again
    outbox.flush()
    assert len(_sent(dispatcher)) == 256 and outbox.in_flight.count["cpu"] == 256


def test_a_resend_of_every_queued_job_adds_none_twice():
    outbox, dispatcher = _outbox()
    jobs = [(_job("B", i), "cpu") for i in range(1000)]
    outbox.add(jobs)
    outbox.flush()
    outbox.add(jobs)  # a lost consumer's queue: every dispatched, unstarted job, the waiting ones too
    assert outbox.waiting() == 1000, "the 256 sent go back in line; the 744 waiting stay as they are"
    outbox.in_flight.clear()  # (as if every worker had started what it had)
    sent = []
    while outbox.waiting():
        outbox.flush()
        sent += _sent(dispatcher)
        outbox.in_flight.clear()
    assert len(sent) == 1000 and len({j.task_id for j in sent}) == 1000
    fq = FairQueue()
    assert fq.push(_job("B", 1), DEFAULT_SHARE) and not fq.push(_job("B", 1), DEFAULT_SHARE)
    assert fq.push(_job("B", 1, attempt=2), DEFAULT_SHARE), "a later attempt is another job"


def test_waiting_jobs_of_a_cancelled_run_are_dropped_at_their_turn():
    outbox, dispatcher = _outbox()
    outbox.add((_job("gone", i), "cpu") for i in range(1000))
    outbox.add((_job("live", i), "cpu") for i in range(10))
    outbox.flush(lambda job: job.run_id == "live")
    assert _runs(_sent(dispatcher)) == "live" * 10
    assert outbox.waiting() == 0


def test_share_is_asked_per_job_and_a_lane_keeps_its_first_share():
    asked: list[str] = []

    def share(job: Job) -> Share:
        asked.append(job.task_id)
        return DEFAULT_SHARE

    outbox, _ = _outbox(share=share)
    outbox.add((_job("B", i), "cpu") for i in range(5))
    assert asked == [f"t{i}" for i in range(5)]


def test_jobs_waiting_for_their_turn_are_a_metric_per_queue():
    from scheduler.metrics import SchedulerMetrics

    outbox, _ = _outbox()
    outbox.add((_job("B", i), "cpu") for i in range(1000))
    outbox.flush()
    metrics = SchedulerMetrics()
    metrics.on_waiting(outbox.waiting_turn())
    assert metrics.registry.get_sample_value("nerv_jobs_waiting_turn", {"queue": "cpu"}) == 1000 - 256
    assert metrics.registry.get_sample_value("nerv_jobs_waiting_turn", {"queue": "io"}) == 0
