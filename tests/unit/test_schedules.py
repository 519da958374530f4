"""Schedules (issue 11, idem), pure parts: cron and interval slots, catchup, overlap decisions, the fold
of the schedules stream (idempotent, snapshot), run ids; and the scheduler room against a fake store."""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from nerv_cluster import constants
from nerv_cluster import state as st
from nerv_cluster.errors import IdempotencyKeyError, ScheduleError
from nerv_cluster.idempotency import run_id_for_key
from nerv_cluster.ids import is_valid_id
from nerv_cluster.model import Event, EventType, WorkflowDef
from nerv_cluster.schedules import (
    FIRE_TASK,
    Schedule,
    ScheduleSpec,
    apply_schedule,
    check_spec,
    decide,
    due_slots,
    event_run_id,
    fire_definition,
    fire_run_id,
    fold_schedules,
    next_slot,
)
from scheduler.schedules import ScheduleRoom

E = EventType
UTC = ZoneInfo("UTC")


def ts(*args: int, tz: str = "UTC") -> float:
    return datetime(*args, tzinfo=ZoneInfo(tz)).timestamp()  # type: ignore[misc]


def spec(**kw: Any) -> ScheduleSpec:
    base: dict[str, Any] = {"name": "nightly", "factory": "etl.build"}
    if "cron" not in kw:
        base["every"] = 10.0
    return check_spec(ScheduleSpec(**{**base, **kw}))


# -- slots ------------------------------------------------------------------------------------------


def test_cron_next_slot_is_the_next_match_strictly_after() -> None:
    s = spec(cron="0 2 * * *")
    assert next_slot(s, ts(2026, 12, 1, 1, 59)) == ts(2026, 12, 1, 2, 0)
    assert next_slot(s, ts(2026, 12, 1, 2, 0)) == ts(2026, 12, 2, 2, 0)  # strictly after
    assert next_slot(spec(cron="*/15 * * * *"), ts(2026, 12, 1, 10, 7)) == ts(2026, 12, 1, 10, 15)


def test_cron_is_read_in_the_schedules_time_zone_across_daylight_saving() -> None:
    s = spec(cron="0 2 * * *", timezone="Europe/Paris")
    assert next_slot(s, ts(2026, 12, 1, 0, 0)) == ts(2026, 12, 1, 2, 0, tz="Europe/Paris")
    # Summer time in Paris: 02:00 local is 00:00 UTC.
    assert next_slot(s, ts(2026, 7, 1, 0, 0, tz="Europe/Paris")) == ts(2026, 7, 1, 0, 0)


def test_every_slots_are_multiples_of_the_interval_since_the_epoch() -> None:
    s = spec(every=30.0)
    assert next_slot(s, 1_000_000.0) == 1_000_020.0
    assert next_slot(s, 1_000_020.0) == 1_000_050.0
    assert next_slot(spec(every=0.1), 5.05) == pytest.approx(5.1)
    assert next_slot(spec(every=0.1), 0.3) == 0.4  # rounded: 3 * 0.1 is not 0.3 in floats


def test_due_slots_are_the_latest_in_the_window_oldest_first() -> None:
    s = spec(every=10.0)
    assert due_slots(s, 100.0, 100.0, 5) == []
    assert due_slots(s, 100.0, 109.9, 5) == []
    assert due_slots(s, 100.0, 110.0, 5) == [110.0]  # a slot exactly now is due
    assert due_slots(s, 100.0, 155.0, 2) == [140.0, 150.0]
    assert due_slots(s, 95.0, 155.0, 100) == [100.0, 110.0, 120.0, 130.0, 140.0, 150.0]
    c = spec(cron="0 * * * *")
    since = ts(2026, 12, 1, 0, 30)
    assert due_slots(c, since, ts(2026, 12, 1, 3, 0), 10) == [
        ts(2026, 12, 1, 1, 0),
        ts(2026, 12, 1, 2, 0),
        ts(2026, 12, 1, 3, 0),
    ]
    assert due_slots(c, since, ts(2026, 12, 1, 3, 0), 1) == [ts(2026, 12, 1, 3, 0)]


def test_due_slots_cost_the_catchup_bound_not_the_missed_slots() -> None:
    # A year of 1 s slots missed: still only the latest `keep` computed.
    s = spec(every=1.0)
    assert due_slots(s, 0.0, 365 * 86400.0, 3) == [365 * 86400.0 - 2, 365 * 86400.0 - 1, 365 * 86400.0]
    c = spec(cron="* * * * *")
    got = due_slots(c, 0.0, ts(2026, 12, 1, 0, 0), 2)
    assert got == [ts(2026, 11, 30, 23, 59), ts(2026, 12, 1, 0, 0)]


@pytest.mark.parametrize(
    "bad",
    [
        {"cron": "61 * * * *"},
        {"cron": "nope"},
        {"every": 0.0},
        {"every": -1.0},
        {"every": float("nan")},
        {"every": True},
        {"overlap": "queue"},
        {"catchup": 0},
        {"catchup": "yes"},
        {"timezone": "Nowhere/Land"},
        {"name": "has space"},
        {"name": "x" * 65},
        {"name": "a:b"},
        {"factory": ""},
        {"queue": "gpu"},
    ],
)
def test_invalid_specs_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ScheduleError):
        spec(**bad)


def test_exactly_one_of_cron_and_every() -> None:
    with pytest.raises(ScheduleError):
        check_spec(ScheduleSpec("n", "f"))
    with pytest.raises(ScheduleError):
        check_spec(ScheduleSpec("n", "f", cron="* * * * *", every=1.0))


def test_spec_round_trips_through_json() -> None:
    s = spec(cron="0 2 * * 1-5", overlap="buffer_one", catchup=3, timezone="Asia/Tokyo", kwargs={"a": [1]})
    assert ScheduleSpec.from_dict(s.to_dict()) == s


# -- decisions --------------------------------------------------------------------------------------


def sched(**kw: Any) -> Schedule:
    since = kw.pop("since", 100.0)
    return Schedule(spec(**kw), since=since)


def test_a_due_slot_fires_and_the_next_look_is_the_next_slot() -> None:
    turn = decide(sched(), 110.5, running=False)
    assert turn.fire == (110.0,) and turn.skip_upto is None and turn.next_at == 120.0
    assert decide(sched(), 105.0, running=False).fire == ()
    assert decide(sched(), 105.0, running=False).next_at == 110.0


def test_catchup_false_fires_only_the_latest_missed_slot() -> None:
    assert decide(sched(overlap="allow"), 155.0, running=False).fire == (150.0,)


def test_catchup_bounds_the_missed_slots_fired_with_overlap_allow() -> None:
    assert decide(sched(overlap="allow", catchup=True), 135.0, running=True).fire == (110.0, 120.0, 130.0)
    assert decide(sched(overlap="allow", catchup=2), 135.0, running=False).fire == (120.0, 130.0)
    many = decide(sched(overlap="allow", catchup=True, since=0.0), 1e6, running=False)
    assert len(many.fire) == constants.SCHEDULE_MAX_CATCHUP and many.fire[-1] == 1e6


def test_skip_records_the_slots_due_while_the_last_run_runs() -> None:
    turn = decide(sched(overlap="skip"), 121.0, running=True)
    assert turn.fire == () and turn.skip_upto == 120.0 and turn.next_at == 130.0
    assert turn.skip_count == 2  # 110 and 120 were both passed over, not only the latest
    assert decide(sched(overlap="skip", since=0.0), 1e6 + 5, running=True).skip_count == 100_000
    hourly = Schedule(spec(cron="0 * * * *"), since=0.0)  # 1970-01-01T00:00 UTC
    assert decide(hourly, 3 * 3600 + 5.0, running=True).skip_count == 3  # 01:00, 02:00, 03:00
    # Skip never catches up two at once: the latest due slot, whatever catchup says.
    assert decide(sched(overlap="skip", catchup=True), 135.0, running=False).fire == (130.0,)


def test_buffer_one_leaves_the_slots_due_until_the_run_ends_then_fires_the_latest() -> None:
    s = sched(overlap="buffer_one")
    waiting = decide(s, 125.0, running=True)
    assert waiting.fire == () and waiting.skip_upto is None
    assert decide(s, 137.0, running=False).fire == (130.0,)


def test_paused_fires_no_slot_but_its_triggers() -> None:
    s = sched()
    paused = Schedule(s.spec, s.since, paused=True, triggers=(("t1", 104.0),))
    turn = decide(paused, 500.0, running=True)
    assert turn.fire == () and turn.triggers == (("t1", 104.0),) and turn.next_at is None


# -- the fold ---------------------------------------------------------------------------------------


def cmd(kind: EventType, name: str = "nightly", **data: Any) -> Event:
    return Event(kind, event_run_id(name), data={"name": name, **data}, ts=1.0)


def test_the_fold_of_a_schedules_life() -> None:
    s = spec()
    log = [
        cmd(E.SCHEDULE_SET, spec=s.to_dict(), at=100.0),
        cmd(E.SCHEDULE_FIRED, slot=110.0, run="nightly.110000"),
        cmd(E.SCHEDULE_SKIPPED, upto=120.0, n=1),
        cmd(E.SCHEDULE_PAUSED, at=125.0),
        cmd(E.SCHEDULE_TRIGGERED, at=126.0),
        cmd(E.SCHEDULE_RESUMED, at=150.0),
    ]
    got = fold_schedules(log)["nightly"]
    assert got.since == 150.0 and not got.paused and got.fired == 1 and got.skipped == 1
    assert got.last_run == "nightly.110000" and got.last_slot == 110.0
    assert got.triggers == ((log[4].id, 126.0),)
    done = cmd(E.SCHEDULE_FIRED, slot=126.0, run="nightly.tx", trigger=log[4].id)
    after = apply_schedule(fold_schedules(log), done)["nightly"]
    assert after.triggers == () and after.last_run == "nightly.tx" and after.since == 150.0
    assert "nightly" not in apply_schedule(fold_schedules(log), cmd(E.SCHEDULE_DELETED))


def test_a_changed_definition_takes_effect_from_when_it_was_set() -> None:
    first = cmd(E.SCHEDULE_SET, spec=spec().to_dict(), at=100.0)
    fired = cmd(E.SCHEDULE_FIRED, slot=110.0, run="r")
    again = cmd(E.SCHEDULE_SET, spec=spec(every=60.0).to_dict(), at=105.0)
    got = fold_schedules([first, fired, again])["nightly"]
    assert got.spec.every == 60.0 and got.since == 110.0 and got.last_run == "r"


def test_the_fold_is_idempotent_and_ignores_what_it_cannot_read() -> None:
    rng = random.Random(7)
    s = spec()
    events = [
        cmd(E.SCHEDULE_SET, spec=s.to_dict(), at=100.0),
        cmd(E.SCHEDULE_FIRED, slot=110.0, run="a"),
        cmd(E.SCHEDULE_TRIGGERED, at=111.0),
        cmd(E.SCHEDULE_SKIPPED, upto=120.0),
        cmd(E.SCHEDULE_FIRED, slot=130.0, run="b"),
        cmd(E.SCHEDULE_PAUSED, at=131.0),
        cmd(E.SCHEDULE_SET, name="other", spec=spec(name="other").to_dict(), at=90.0),
        cmd(E.SCHEDULE_FIRED, name="ghost", slot=1.0, run="g"),
        Event(E.SCHEDULE_SET, event_run_id("bad"), data={"spec": {"name": "bad"}, "at": 1.0}),
        Event(E.SCHEDULE_FIRED, event_run_id("nightly"), data={"name": "nightly", "slot": "x"}),
        Event(E.TASK_COMPLETED, "some-run", "t", 1, {"result": 1}),
    ]
    want = fold_schedules(events)
    assert set(want) == {"nightly", "other"}
    for _ in range(50):  # duplicates anywhere after their original change nothing
        log = list(events)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(log))
            log.insert(rng.randint(i + 1, len(log)), log[i])
        assert fold_schedules(log) == want


def test_a_snapshot_replaces_everything_before_it() -> None:
    events = [
        cmd(E.SCHEDULE_SET, spec=spec().to_dict(), at=100.0),
        cmd(E.SCHEDULE_FIRED, slot=110.0, run="a"),
        cmd(E.SCHEDULE_TRIGGERED, at=111.0),
        cmd(E.SCHEDULE_PAUSED, at=112.0),
    ]
    folded = fold_schedules(events)
    snap = Event(
        E.SCHEDULES_SNAPSHOT, event_run_id("*"), data={"schedules": [s.to_dict() for s in folded.values()]}
    )
    assert fold_schedules([snap]) == folded
    assert (
        fold_schedules([cmd(E.SCHEDULE_SET, name="gone", spec=spec(name="gone").to_dict(), at=1.0), snap])
        == folded
    )


def test_schedule_events_never_change_a_run() -> None:
    s = st.EMPTY
    for kind in (E.SCHEDULE_SET, E.SCHEDULE_FIRED, E.SCHEDULES_SNAPSHOT):
        assert st.apply(s, cmd(kind)) is s


# -- run ids and the fire's workflow ---------------------------------------------------------------


def test_fire_run_ids_derive_from_schedule_and_slot() -> None:
    assert fire_run_id("nightly", 1796090400.0) == "nightly.1796090400000"
    assert fire_run_id("n", 0.1) != fire_run_id("n", 0.2)
    assert is_valid_id(fire_run_id("x" * constants.MAX_SCHEDULE_NAME_CHARS, 4e9))


def test_the_fire_is_one_task_calling_the_factory_with_the_slot() -> None:
    d = fire_definition(spec(kwargs={"region": "eu"}, queue="cpu"), 120.0)
    (t,) = d.tasks
    assert t.id == FIRE_TASK and t.fn == "etl.build" and t.queue == "cpu"
    assert list(t.args) == [120.0] and dict(t.kwargs) == {"region": "eu"}
    assert d.meta["schedule"] == "nightly" and d.meta["slot"] == 120.0
    assert WorkflowDef.from_dict(d.to_dict()) == d


# -- idempotency keys -------------------------------------------------------------------------------


def test_idempotency_keys_name_one_valid_run_id_each() -> None:
    assert run_id_for_key("nightly-2026-12-01") == run_id_for_key("nightly-2026-12-01")
    assert run_id_for_key("a/b") != run_id_for_key("a-b")  # same slug, different digest
    assert is_valid_id(run_id_for_key("ümlaut ünïcode " * 10))
    assert is_valid_id(run_id_for_key("x" * constants.MAX_IDEMPOTENCY_KEY_CHARS))
    for bad in ("", "x" * (constants.MAX_IDEMPOTENCY_KEY_CHARS + 1), None, 3):
        with pytest.raises(IdempotencyKeyError):
            run_id_for_key(bad)  # type: ignore[arg-type]


# -- the room, against a fake store ---------------------------------------------------------------


class FakeStore:
    """The schedules stream in memory, with the fire script's contract."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, Event]] = []
        self.runs: set[str] = set()
        self._n = 0

    def _add(self, ev: Event) -> None:
        self._n += 1
        self.entries.append((f"{self._n}-0", ev))

    def read(self) -> tuple[list[Event], str]:
        return [e for _, e in self.entries], self.entries[-1][0] if self.entries else ""

    def command(self, ev: Event) -> None:
        self._add(ev)

    def fire(
        self, token: str, fires: Sequence[tuple[Event, Event]], notes: Sequence[Event] = ()
    ) -> list[bool]:
        out = []
        for sub, fired in fires:
            out.append(sub.run_id not in self.runs)
            self.runs.add(sub.run_id)
            self._add(fired)
        for n in notes:
            self._add(n)
        return out

    def compact(self, token: str, last_id: str, snapshot: Event) -> bool:
        if not self.entries or self.entries[-1][0] != last_id:
            return False
        self.entries = []
        self._add(snapshot)
        return True


def test_the_room_fires_each_slot_once_and_keeps_the_stream_bounded() -> None:
    store = FakeStore()
    set_ev = cmd(E.SCHEDULE_SET, spec=spec(every=1.0, overlap="allow").to_dict(), at=100.0)
    store.command(set_ev)
    room = ScheduleRoom(store)  # type: ignore[arg-type]
    room.reload(100.0)
    created: list[str] = []
    now = 100.0
    for _ in range(500):
        now += 1.0
        assert room.next_due() is not None and room.next_due() <= now
        created += [ev.run_id for ev in room.act(now, st.EMPTY, lambda: "tok", "scheduler:tok")]
    assert created == [fire_run_id("nightly", 101.0 + i) for i in range(500)]
    assert len(store.entries) <= constants.SCHEDULES_COMPACT_PER_SCHEDULE + 64 + 1
    assert any(e.type is E.SCHEDULES_SNAPSHOT for _, e in store.entries)
    # A new leader refolds the compacted stream and goes on from the last slot: nothing fires twice.
    again = ScheduleRoom(store)  # type: ignore[arg-type]
    again.reload(now)
    assert again.act(now, st.EMPTY, lambda: "tok2", "scheduler:tok2") == []
    assert fold_schedules(store.read()[0])["nightly"].fired == 500


def test_a_new_leader_that_repeats_an_unrecorded_fire_creates_no_second_run() -> None:
    store = FakeStore()
    store.command(cmd(E.SCHEDULE_SET, spec=spec(every=1.0).to_dict(), at=100.0))
    room = ScheduleRoom(store)  # type: ignore[arg-type]
    room.reload(101.0)
    (sub,) = room.act(101.0, st.EMPTY, lambda: "tok", "s")
    store.entries.pop()  # as if the record were lost: the run exists, the stream does not say so
    again = ScheduleRoom(store)  # type: ignore[arg-type]
    again.reload(101.5)
    assert again.act(101.5, st.EMPTY, lambda: "tok2", "s") == []  # the run existed: not created again
    assert fold_schedules(store.read()[0])["nightly"].since == 101.0
    assert sub.run_id in store.runs


def test_a_schedule_that_cannot_be_built_never_stops_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    import scheduler.schedules as room_module

    real = room_module.fire_definition

    def broken(s: ScheduleSpec, slot: float, trigger: str | None = None) -> WorkflowDef:
        if s.name == "bad":
            raise RuntimeError("a bug")
        return real(s, slot, trigger)

    monkeypatch.setattr(room_module, "fire_definition", broken)
    store = FakeStore()
    for name in ("bad", "good"):
        store.command(cmd(E.SCHEDULE_SET, name=name, spec=spec(name=name, every=1.0).to_dict(), at=100.0))
    room = ScheduleRoom(store)  # type: ignore[arg-type]
    room.reload(101.0)
    assert [ev.run_id for ev in room.act(101.0, st.EMPTY, lambda: "tok", "s")] == [fire_run_id("good", 101.0)]
    assert room.next_due() == 102.0
