"""The in-process EventBus: Blinker signals, sender filtering, weak handlers, middleware, history."""

from __future__ import annotations

import gc
import logging
from dataclasses import replace

import pytest

from nerv_cluster.bus import ALL, EventBus, RedisBridge
from nerv_cluster.constants import Keys
from nerv_cluster.model import Event, EventType

E = EventType


def event(
    kind: EventType = E.TASK_COMPLETED, run_id: str = "run-a", task_id: str | None = "t", **data
) -> Event:
    return Event(kind, run_id, task_id, 1, data, ts=1.0)


class Recorder:
    def __init__(self) -> None:
        self.seen: list[Event] = []

    def __call__(self, ev: Event) -> None:
        self.seen.append(ev)

    @property
    def types(self) -> list[str]:
        return [e.type.value for e in self.seen]


def test_subscribe_and_unsubscribe():
    bus = EventBus()
    rec = Recorder()
    unsubscribe = bus.subscribe(E.TASK_COMPLETED, rec)
    e1 = event()
    assert bus.publish(e1) is e1
    bus.publish(event(E.TASK_FAILED))  # another type: not for this handler
    assert rec.seen == [e1]
    unsubscribe()
    bus.publish(event())
    assert rec.seen == [e1]


def test_event_type_given_as_a_string_in_any_case():
    bus = EventBus()
    rec = Recorder()
    bus.subscribe("task_started", rec)
    bus.publish(event(E.TASK_STARTED))
    assert rec.types == ["TASK_STARTED"]
    assert bus.signal("task_started") is bus.signal(E.TASK_STARTED)
    with pytest.raises(ValueError):
        bus.subscribe("no_such_event", rec)


def test_sender_filters_by_run_id():
    bus = EventBus()
    only_a, every = Recorder(), Recorder()
    bus.subscribe(E.TASK_COMPLETED, only_a, sender="run-a")
    bus.subscribe(E.TASK_COMPLETED, every)
    bus.publish(event(run_id="run-a"))
    bus.publish(event(run_id="run-b"))
    bus.publish(event(run_id="run-a"))
    assert [e.run_id for e in only_a.seen] == ["run-a", "run-a"]
    assert [e.run_id for e in every.seen] == ["run-a", "run-b", "run-a"]


def test_unsubscribe_of_a_sender_subscription():
    bus = EventBus()
    rec = Recorder()
    unsubscribe = bus.subscribe(E.TASK_COMPLETED, rec, sender="run-a")
    unsubscribe()
    bus.publish(event(run_id="run-a"))
    assert rec.seen == []


def test_catch_all():
    bus = EventBus()
    everything, run_b = Recorder(), Recorder()
    bus.subscribe(ALL, everything)
    bus.subscribe("*", run_b, sender="run-b")
    kinds = [E.WORKFLOW_SUBMITTED, E.TASK_DISPATCHED, E.TASK_FAILED, E.WORKFLOW_FAILED]
    for k in kinds:
        bus.publish(event(k, run_id="run-b"))
    bus.publish(event(E.TASK_COMPLETED, run_id="run-c"))
    assert everything.types == [k.value for k in kinds] + ["TASK_COMPLETED"]
    assert run_b.types == [k.value for k in kinds]


def test_typed_and_catch_all_handlers_both_get_the_event():
    bus = EventBus()
    typed, anything = Recorder(), Recorder()
    bus.subscribe(E.TASK_COMPLETED, typed)
    bus.subscribe(ALL, anything)
    e = event()
    bus.publish(e)
    assert typed.seen == [e] and anything.seen == [e]


def test_weak_handlers_are_dropped_when_garbage():
    bus = EventBus()
    calls: list[str] = []

    def make(tag: str):
        def handler(ev: Event) -> None:
            calls.append(tag)

        return handler

    weak = make("weak")
    strong = make("strong")
    bus.subscribe(E.TASK_COMPLETED, weak)  # weak=True is the default
    bus.subscribe(E.TASK_COMPLETED, strong, weak=False)
    bus.publish(event())
    assert sorted(calls) == ["strong", "weak"]

    del weak, strong
    gc.collect()
    calls.clear()
    bus.publish(event())
    assert calls == ["strong"]


def test_weak_bound_method_is_dropped_with_its_object():
    bus = EventBus()
    calls: list[Event] = []

    class Listener:
        def on_event(self, ev: Event) -> None:
            calls.append(ev)

    listener = Listener()
    bus.subscribe(ALL, listener.on_event)
    bus.publish(event())
    assert len(calls) == 1
    del listener
    gc.collect()
    bus.publish(event())
    assert len(calls) == 1


def test_middleware_transforms():
    bus = EventBus()
    rec = Recorder()
    bus.subscribe(E.TASK_COMPLETED, rec)
    bus.use(lambda ev: replace(ev, data={**ev.data, "seen_by": ["first"]}))
    bus.use(lambda ev: replace(ev, data={**ev.data, "seen_by": [*ev.data["seen_by"], "second"]}))
    out = bus.publish(event(result=1))
    assert out is not None
    assert dict(out.data) == {"result": 1, "seen_by": ["first", "second"]}
    assert rec.seen == [out]
    assert bus.history() == [out]


def test_middleware_filters():
    bus = EventBus()
    rec = Recorder()
    bus.subscribe(ALL, rec)
    bus.use(lambda ev: None if ev.type is E.TASK_STARTED else ev)
    assert bus.publish(event(E.TASK_STARTED)) is None
    kept = bus.publish(event(E.TASK_COMPLETED))
    assert rec.types == ["TASK_COMPLETED"]
    assert bus.history() == [kept]  # a dropped event is not history either


def test_middleware_can_be_removed():
    bus = EventBus()
    rec = Recorder()
    bus.subscribe(ALL, rec)
    remove = bus.use(lambda ev: None)
    bus.publish(event())
    remove()
    remove()  # twice is harmless
    bus.publish(event())
    assert len(rec.seen) == 1


def test_a_raising_middleware_is_contained(caplog):
    bus = EventBus()
    rec = Recorder()
    bus.subscribe(ALL, rec)

    def broken(ev: Event) -> Event:
        raise RuntimeError("middleware bug")

    bus.use(broken)
    bus.use(lambda ev: replace(ev, source="tagged"))
    with caplog.at_level(logging.ERROR, logger="nerv_cluster.bus"):
        out = bus.publish(event())
    assert out is not None and out.source == "tagged"  # passed on unchanged, later middleware still ran
    assert rec.seen == [out]
    assert "middleware" in caplog.text and "middleware bug" in caplog.text


def test_a_raising_handler_does_not_stop_the_others(caplog):
    bus = EventBus()
    before, after, anything = Recorder(), Recorder(), Recorder()

    def broken(ev: Event) -> None:
        raise RuntimeError("handler bug")

    bus.subscribe(E.TASK_COMPLETED, before)
    bus.subscribe(E.TASK_COMPLETED, broken)
    bus.subscribe(E.TASK_COMPLETED, after)
    bus.subscribe(ALL, anything)
    with caplog.at_level(logging.ERROR, logger="nerv_cluster.bus"):
        e = bus.publish(event())
    assert before.seen == [e] and after.seen == [e] and anything.seen == [e]
    assert "handler bug" in caplog.text
    assert bus.history() == [e]


def test_history_is_bounded():
    bus = EventBus(history_limit=3)
    events = [event(task_id=f"t{i}") for i in range(5)]
    for e in events:
        bus.publish(e)
    assert bus.history() == events[-3:]


def test_history_filters_by_run_and_type():
    bus = EventBus()
    a1 = bus.publish(event(E.TASK_COMPLETED, run_id="a"))
    b1 = bus.publish(event(E.TASK_FAILED, run_id="b"))
    a2 = bus.publish(event(E.TASK_FAILED, run_id="a"))
    a3 = bus.publish(event(E.WORKFLOW_FAILED, run_id="a", task_id=None))
    assert bus.history() == [a1, b1, a2, a3]
    assert bus.history(run_id="a") == [a1, a2, a3]
    assert bus.history(event_type="task_failed") == [b1, a2]
    assert bus.history(run_id="a", event_type=E.TASK_FAILED) == [a2]
    assert bus.history(run_id="zzz") == []


def test_publish_without_subscribers_still_records_history():
    bus = EventBus()
    e = bus.publish(event())
    assert bus.history() == [e]


def test_the_bridge_hands_a_cache_hits_event_on_as_one_completion_per_task():
    bus = EventBus()
    got: list[Event] = []
    bus.subscribe(EventType.TASK_COMPLETED, got.append, weak=False)
    bridge = RedisBridge(None, Keys(), bus)  # type: ignore[arg-type]  # no connection needed to hand on
    hits = Event(EventType.CACHE_HITS, "r1", data={"hits": [["a", 1, 3, "r0/a"], ["b", 2, None, "r0/b"]]})
    bridge._on_message({"data": hits.to_json(), "channel": "c"})
    assert [
        (e.task_id, e.attempt, e.data["result"], e.data["cached"], e.data["cached_from"]) for e in got
    ] == [
        ("a", 1, 3, True, "r0/a"),
        ("b", 2, None, True, "r0/b"),
    ]
    assert len({e.id for e in got}) == 2 and all(e.run_id == "r1" for e in got)
