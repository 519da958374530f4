"""Schedules (issue 11, part 5) through real Redis, real schedulers and real worker processes.

Counters in Redis (``test:sched:<label>:slots``, one field per slot, incremented by the fired run's
task) prove each slot ran once; ``...:peak`` is the most bodies that ran at once.
"""

from __future__ import annotations

import itertools
import json
import time

import nerv_testtasks as tt
import pytest
from typer.testing import CliRunner

from nerv_cluster import EventType, RunStatus
from nerv_cluster.cli import app
from nerv_cluster.constants import Keys
from nerv_cluster.errors import LeaseLostError, ScheduleError, ScheduleNotFoundError
from nerv_cluster.model import Event
from nerv_cluster.schedules import ScheduleSpec, event_run_id, fold_schedules
from nerv_cluster.schedulestore import ScheduleStore
from tests.integration.cluster import Cluster

pytestmark = pytest.mark.timeout(120)


def _slots(c: Cluster, label: str) -> dict[float, int]:
    return {float(k): int(v) for k, v in c.redis.hgetall(f"test:sched:{label}:slots").items()}


def _stream(c: Cluster) -> list[EventType]:
    return [ev.type for ev in ScheduleStore(c.redis, c.client.keys).read()[0]]


def _wait_for(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _fired_runs(c: Cluster, name: str) -> list[str]:
    return [
        str(ev.data["run"])
        for ev in ScheduleStore(c.redis, c.client.keys).read()[0]
        if ev.type is EventType.SCHEDULE_FIRED and ev.data["name"] == name
    ]


def test_every_second_fires_five_runs_in_five_seconds(own_cluster: Cluster) -> None:
    c = own_cluster
    c.scheduler()
    c.wait_leader()
    c.worker("io", 4)
    c.client.schedule("tick", tt.scheduled, every=1.0, overlap="allow", kwargs={"label": "tick"})
    time.sleep(5.0)
    c.client.delete_schedule("tick")
    fired = _fired_runs(c, "tick")
    assert 4 <= len(fired) <= 6, fired
    for rid in fired:
        res = c.client.wait(rid, timeout=30)
        assert res.status is RunStatus.COMPLETED, res.reason
    slots = _slots(c, "tick")
    assert len(slots) == len(fired) and set(slots.values()) == {1}, slots
    assert all(s == int(s) for s in slots), "every=1.0 slots are whole seconds"
    time.sleep(1.5)
    assert len(_fired_runs(c, "tick")) == len(fired), "a deleted schedule fires no more"


@pytest.mark.timeout(150)
def test_no_slot_fires_twice_with_two_schedulers_and_the_leader_killed(own_cluster: Cluster) -> None:
    c = own_cluster
    first = c.scheduler()
    c.wait_leader()
    second = c.scheduler()
    c.worker("io", 4)
    c.client.schedule(
        "failover", tt.scheduled, every=1.0, overlap="allow", catchup=True, kwargs={"label": "failover"}
    )
    _wait_for(lambda: len(_slots(c, "failover")) >= 3, 15, "three fires before the kill")
    leader_token = c.redis.get(c.client.keys.lease)
    leader = first if first.log_tail(400).count("leader (token") else second
    c.kill(leader)
    _wait_for(lambda: c.redis.get(c.client.keys.lease) not in (None, leader_token), 15, "a new leader")
    before = len(_slots(c, "failover"))
    _wait_for(lambda: len(_slots(c, "failover")) >= before + 3, 15, "three fires after the takeover")
    c.client.delete_schedule("failover")
    fired = _fired_runs(c, "failover")
    for rid in fired:
        assert c.client.wait(rid, timeout=30).status is RunStatus.COMPLETED
    slots = _slots(c, "failover")
    assert set(slots.values()) == {1}, f"a slot ran twice: {slots}"
    assert len(set(fired)) == len(fired) == len(slots)
    ordered = sorted(slots)
    # catchup=True: the slots missed during the failover fired too, so there is no gap.
    assert ordered == [ordered[0] + i for i in range(len(ordered))], ordered


def test_overlap_skip_with_a_run_slower_than_the_interval(own_cluster: Cluster) -> None:
    c = own_cluster
    c.scheduler()
    c.wait_leader()
    c.worker("io", 4)
    c.client.schedule("slowpoke", tt.scheduled, every=1.0, kwargs={"label": "slow", "seconds": 2.5})
    time.sleep(6.5)
    c.client.delete_schedule("slowpoke")
    fired = _fired_runs(c, "slowpoke")
    for rid in fired:
        assert c.client.wait(rid, timeout=30).status is RunStatus.COMPLETED
    assert int(c.redis.get("test:sched:slow:peak") or 0) == 1, "never two runs at once"
    assert 2 <= len(fired) <= 3, fired
    assert EventType.SCHEDULE_SKIPPED in _stream(c)
    slots = sorted(_slots(c, "slow"))
    assert all(b - a >= 3 for a, b in itertools.pairwise(slots)), slots


def test_buffer_one_fires_the_latest_waiting_slot_when_the_run_ends(own_cluster: Cluster) -> None:
    c = own_cluster
    c.scheduler()
    c.wait_leader()
    c.worker("io", 4)
    c.client.schedule(
        "buffered", tt.scheduled, every=1.0, overlap="buffer_one", kwargs={"label": "buf", "seconds": 2.2}
    )
    _wait_for(lambda: len(_fired_runs(c, "buffered")) >= 2, 15, "a second fire")
    c.client.delete_schedule("buffered")
    first, second = _fired_runs(c, "buffered")[:2]
    a = c.client.wait(first, timeout=30)
    b = c.client.wait(second, timeout=30)
    assert int(c.redis.get("test:sched:buf:peak") or 0) == 1
    # The second fired right after the first ended (the buffered slot), not a slot later.
    assert b.started_at is not None and a.finished_at is not None
    assert b.started_at - a.finished_at < 0.9, (a.finished_at, b.started_at)


def test_nerv_schedule_cli_and_bad_definitions(cluster: Cluster) -> None:
    runner = CliRunner()
    env = {"NERV_REDIS_URL": cluster.client.settings.redis_url}
    out = runner.invoke(
        app, ["schedule", "add", "nightly", "nerv_testtasks.scheduled", "--cron", "0 2 * * *",
              "--kwargs", '{"label": "cli"}'], env=env,
    )  # fmt: skip
    assert out.exit_code == 0, out.output
    listed = json.loads(runner.invoke(app, ["schedule", "list", "--json"], env=env).output)
    (row,) = [r for r in listed if r["name"] == "nightly"]
    assert row["next_fire"] is not None and time.gmtime(row["next_fire"]).tm_hour == 2
    assert row["last_run"] is None
    out = runner.invoke(app, ["schedule", "trigger", "nightly", "--wait"], env=env)
    assert out.exit_code == 0, out.output
    run_id = out.output.strip().splitlines()[-1]
    assert cluster.client.status(run_id).status is RunStatus.COMPLETED
    assert runner.invoke(app, ["schedule", "pause", "nightly"], env=env).exit_code == 0
    listed = json.loads(runner.invoke(app, ["schedule", "list", "--json"], env=env).output)
    (row,) = [r for r in listed if r["name"] == "nightly"]
    assert row["paused"] and row["next_fire"] is None
    assert row["last_run"] == run_id and row["last_status"] == "COMPLETED"
    assert runner.invoke(app, ["schedule", "resume", "nightly"], env=env).exit_code == 0
    assert runner.invoke(app, ["schedule", "list"], env=env).exit_code == 0
    assert runner.invoke(app, ["schedule", "delete", "nightly"], env=env).exit_code == 0
    assert "nightly" not in cluster.client.schedules()
    with pytest.raises(ScheduleNotFoundError):
        cluster.client.pause_schedule("nightly")
    n = len(_stream(cluster))
    for bad in (
        {"cron": "not a cron"},
        {"every": 0.0},
        {"every": 1.0, "cron": "* * * * *"},
        {},
        {"every": 1.0, "overlap": "sometimes"},
        {"every": 1.0, "timezone": "Mars/Olympus"},
        {"every": 1.0, "catchup": -1},
        {"every": 1.0, "kwargs": {"x": object()}},
    ):
        with pytest.raises(ScheduleError):
            cluster.client.schedule("bad", tt.scheduled, **bad)  # type: ignore[arg-type]
    with pytest.raises(ScheduleError):
        cluster.client.schedule("bad name!", tt.scheduled, every=1.0)
    with pytest.raises(ScheduleError):
        cluster.client.schedule("bad", "nerv_testtasks.no_such_task", every=1.0)
    assert len(_stream(cluster)) == n, "nothing was written"


def test_the_fire_and_compact_scripts_are_fenced_and_refuse_a_moved_stream(cluster: Cluster) -> None:
    keys = Keys("nerv-test-schedule-scripts")
    store = ScheduleStore(cluster.redis, keys)
    for k in (keys.schedules, keys.lease, keys.active, keys.runs, keys.log("nightly.1000")):
        cluster.redis.delete(k)
    cluster.redis.set(keys.lease, "tok")
    spec = ScheduleSpec("nightly", "nerv_testtasks.scheduled", every=1.0)
    set_ev = Event(EventType.SCHEDULE_SET, event_run_id("nightly"), data={"spec": spec.to_dict(), "at": 0.5})
    store.command(set_ev)
    sub = Event(EventType.WORKFLOW_SUBMITTED, "nightly.1000", data={"workflow": {}}, ts=1.0)
    fired = Event(
        EventType.SCHEDULE_FIRED,
        event_run_id("nightly"),
        data={"name": "nightly", "slot": 1.0, "run": sub.run_id},
    )
    with pytest.raises(LeaseLostError):
        store.fire("other", [(sub, fired)])
    assert store.fire("tok", [(sub, fired)]) == [True]
    assert store.fire("tok", [(sub, fired)]) == [False], "a run of that id exists: not created again"
    assert cluster.redis.xlen(keys.log(sub.run_id)) == 1 and cluster.redis.sismember(keys.active, sub.run_id)
    events, last = store.read()
    snapshot = Event(
        EventType.SCHEDULES_SNAPSHOT,
        event_run_id("*"),
        data={"schedules": [s.to_dict() for s in fold_schedules(events).values()]},
    )
    store.command(
        Event(EventType.SCHEDULE_PAUSED, event_run_id("nightly"), data={"name": "nightly", "at": 2.0})
    )
    assert not store.compact("tok", last, snapshot), "a command came after the fold: no compaction"
    events, last = store.read()
    with pytest.raises(LeaseLostError):
        store.compact("other", last, snapshot)
    snapshot = Event(
        EventType.SCHEDULES_SNAPSHOT,
        event_run_id("*"),
        data={"schedules": [s.to_dict() for s in fold_schedules(events).values()]},
    )
    assert store.compact("tok", last, snapshot)
    after, _ = store.read()
    assert [e.type for e in after] == [EventType.SCHEDULES_SNAPSHOT]
    assert fold_schedules(after) == fold_schedules(events)
    # The second record of the same slot folded to nothing: one fire.
    assert fold_schedules(after)["nightly"].paused and fold_schedules(after)["nightly"].fired == 1
