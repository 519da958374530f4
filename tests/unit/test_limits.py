"""Limits (issue 11): key templates, the holding structure, the rate window and the gate, without Redis.

The gate is driven the way the scheduler drives it: ``decide`` with the gate, the decided events folded
back, ``observe`` after every fold, ``release`` for what was freed.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import pytest

from nerv_cluster import checkpoint
from nerv_cluster import state as st
from nerv_cluster.errors import WorkflowError
from nerv_cluster.limits import Concurrency, Gate, HeldQueue, RateLimit, Window, template_fields
from nerv_cluster.model import Event, EventType, TaskDef, TaskPriority, WorkflowDef
from nerv_cluster.registry import Registry, task
from nerv_cluster.workflow import Workflow
from scheduler.decisions import Decisions, decide
from tests.unit.helpers import ev, submitted, td, wdef

E = EventType

# -- key templates -----------------------------------------------------------------------------------


def test_template_fields_are_plain_parameter_names() -> None:
    assert template_fields("crm-api") == ()
    assert template_fields("tenant:{customer}/{region}:{customer}") == ("customer", "region")
    for bad in ("", "{0}", "{a.b}", "{a[0]}", "{a!r}", "{a:>4}", "{", "x" * 300):
        with pytest.raises(WorkflowError):
            template_fields(bad)


def test_limits_refuse_bad_values() -> None:
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(WorkflowError):
            Concurrency("k", bad)  # type: ignore[arg-type]
    for rate, per in ((0, 1.0), (1, 0), (1, -1.0), (1, float("inf")), (2.5, 1.0)):
        with pytest.raises(WorkflowError):
            RateLimit("r", rate, per=per)  # type: ignore[arg-type]
    with pytest.raises(WorkflowError):
        RateLimit("", 1)


def _registry() -> Registry:
    return Registry()


def test_a_template_is_bound_to_the_call_and_resolved_with_upstream_results() -> None:
    reg = _registry()

    @task(registry=reg, name="t.src")
    def src() -> str:
        return "acme"

    @task(registry=reg, name="t.call", concurrency=Concurrency("tenant:{customer}:{page}", 3))
    def call(customer: str, page: int = 7) -> int:
        return page

    wf = Workflow("w", registry=reg)
    up = wf.add(src, id="up")
    wf.add(call, up, id="by-ref")
    wf.add(call, "globex", kwargs={"page": 2}, id="literal")
    defs = {t.id: TaskDef.from_dict(t.to_dict()) for t in wf.definition().tasks}  # through the wire
    by_ref, literal = defs["by-ref"].concurrency, defs["literal"].concurrency
    assert by_ref is not None and literal is not None
    assert by_ref.resolve({"up": "acme"}.__getitem__) == "tenant:acme:7"  # the default filled in
    assert literal.resolve({}.__getitem__) == "tenant:globex:2"
    assert literal.limit == 3


def test_a_template_naming_no_parameter_is_an_error_at_task_and_at_add() -> None:
    reg = _registry()
    with pytest.raises(WorkflowError, match="no parameter"):

        @task(registry=reg, name="t.bad", concurrency=Concurrency("t:{nope}", 1))
        def bad(x: int) -> int:
            return x

    @task(registry=reg, name="t.ok")
    def ok(x: int) -> int:
        return x

    wf = Workflow("w", registry=reg)
    with pytest.raises(WorkflowError, match="no parameter"):
        wf.add(ok, 1, concurrency=Concurrency("t:{y}", 1))
    with pytest.raises(WorkflowError, match="do not fit"):
        wf.add(ok, 1, 2, concurrency=Concurrency("t:{x}", 1))
    with pytest.raises(WorkflowError, match="registered here"):
        wf.add("elsewhere.fn", 1, concurrency=Concurrency("t:{x}", 1))
    assert len(wf) == 0  # nothing added
    wf.add("elsewhere.fn", 1, concurrency=Concurrency("static", 1))  # a static key needs no binding


def test_a_long_resolved_key_is_bounded_and_stays_distinct() -> None:
    c = Concurrency("k:{x}", 1, {"x": "a" * 500})
    d = Concurrency("k:{x}", 1, {"x": "a" * 499 + "b"})
    ka, kb = c.resolve({}.__getitem__), d.resolve({}.__getitem__)
    assert len(ka) <= 200 and len(kb) <= 200 and ka != kb


# -- the holding structure and the window --------------------------------------------------------------


def test_held_queue_goes_by_priority_then_submit_order() -> None:
    q = HeldQueue()
    q.push((-1, 2.0, "late", 0, "a", 1))
    q.push((-1, 1.0, "early", 5, "b", 1))
    q.push((-1, 1.0, "early", 2, "c", 1))
    q.push((-3, 9.0, "later", 0, "urgent", 1))
    q.push((-1, 1.0, "early", 2, "c", 1))  # held again: keeps its one place
    assert len(q) == 4
    order = []
    while (item := q.pop(lambda *_: True)) is not None:
        order.append(item[4])
    assert order == ["urgent", "c", "b", "a"]


def test_held_queue_skips_what_moved_on_and_compacts() -> None:
    q = HeldQueue()
    for i in range(3000):
        q.push((0, 0.0, "r1", i, f"t{i}", 1))
    q.push((0, 0.0, "r2", 0, "keep", 1))
    q.forget_run("r1", [f"t{i}" for i in range(3000)])
    assert len(q) == 1 and len(q._heap) == 1  # rebuilt once the stale were most of it
    assert q.pop(lambda rid, tid, a: tid != "keep") is None  # invalid: dropped


def test_window_allows_rate_starts_in_any_per_seconds() -> None:
    w = Window(3, 1.0)
    for t in (0.0, 0.1, 0.2):
        assert w.free(t) > 0
        w.start(t)
    assert w.free(0.5) == 0
    assert w.next_free(0.5) == pytest.approx(1.0)
    assert w.free(0.999) == 0
    assert w.free(1.0) == 1  # the start at 0.0 left the window (now - per, now]
    w.start(1.0)
    assert w.next_free(1.0) == pytest.approx(1.1)


# -- the gate, driven like the scheduler -----------------------------------------------------------------


class Driver:
    """``decide`` with a gate, the events folded back and observed, releases decided again."""

    def __init__(self) -> None:
        self.gate = Gate()
        self.state = st.EMPTY
        self.now = 100.0
        self.jobs: list[tuple[str, str]] = []

    def fold(self, events: Iterable[Event]) -> None:
        events = list(events)
        self.state = st.fold(events, self.state)
        self.gate.observe(events, self.state)

    def step(self, runs: Iterable[str] | None = None) -> list[Event]:
        touched = set(self.state.runs.keys() if runs is None else runs)
        touched |= self.gate.release(self.now, self.state)
        written: list[Event] = []
        while touched:
            out = Decisions()
            for rid in sorted(touched):
                decide(self.state.runs[rid], self.now, "scheduler:t", out, gate=self.gate)
            self.fold(out.events)
            written += out.events
            self.jobs += [(job.run_id, job.task_id) for job, _ in out.jobs]
            # As the scheduler does: runs its events touched are decided again (a map's elements).
            touched = {e.run_id for e in out.events} | self.gate.release(self.now, self.state)
        return written

    def run(self, rid: str) -> st.RunState:
        return self.state.runs[rid]

    def finish(self, rid: str, tid: str, attempt: int = 1) -> None:
        self.fold(
            [
                ev(E.TASK_STARTED, tid, attempt, run_id=rid, worker="w1"),
                ev(E.TASK_COMPLETED, tid, attempt, run_id=rid, worker="w1", result=1),
            ]
        )

    def dispatched(self, rid: str) -> set[str]:
        run = self.run(rid)
        return {tid for tid in run.defs if run.tasks[tid].dispatched and not run.tasks[tid].status.terminal}


def _limited(n: int, key: str = "api", limit: int = 2, **kw: object) -> WorkflowDef:
    return wdef(*(td(f"t{i}", concurrency=Concurrency(key, limit), **kw) for i in range(n)))


def test_the_gate_holds_past_the_limit_and_releases_one_per_freed_slot() -> None:
    d = Driver()
    d.fold([submitted(_limited(5), "r1"), submitted(_limited(3), "r2")])
    events = d.step()
    assert sum(e.type is E.TASK_DISPATCHED for e in events) == 2
    assert sum(e.type is E.TASK_HELD for e in events) == 6
    assert d.gate.in_use("api") == 2 and d.gate.held("api") == 6
    r1 = d.run("r1")
    assert not r1.ready and len(r1.held) == 3  # held tasks leave ready: deciding skips them
    assert all(e.data.get("slot") == "api" for e in events if e.type is E.TASK_DISPATCHED)
    for _ in range(3):
        (rid, tid) = next((r, t) for r in ("r1", "r2") for t in sorted(d.dispatched(r)))
        d.finish(rid, tid)
        assert d.gate.in_use("api") == 1
        d.step([])
        assert d.gate.in_use("api") == 2
    assert d.step() == []  # nothing more to do until a slot frees: no event, no decision


def test_held_tasks_go_by_priority_then_submit_order_across_runs() -> None:
    d = Driver()
    low = wdef(*(td(f"l{i}", concurrency=Concurrency("k", 1)) for i in range(3)))
    high = wdef(td("h0", concurrency=Concurrency("k", 1), priority=TaskPriority.HIGH))
    d.fold([submitted(low, "a-first")])
    d.step()
    d.now += 1
    d.fold([submitted(high, "b-later")])
    d.step()
    order = [d.jobs[-1][1]]
    for _ in range(3):
        rid, tid = d.jobs[-1]
        d.finish(rid, tid)
        d.step([])
        order.append(d.jobs[-1][1])
    assert order == ["l0", "h0", "l1", "l2"]


def test_a_lost_worker_a_cancel_and_a_failure_free_their_slots() -> None:
    d = Driver()
    d.fold([submitted(_limited(4, limit=1), "r1"), submitted(_limited(2, limit=1), "r2")])
    d.step()
    (rid, tid) = d.jobs[-1]
    d.fold([ev(E.TASK_STARTED, tid, 1, run_id=rid, worker="w1")])
    assert d.gate.in_use("api") == 1
    d.fold([ev(E.TASK_PENDING, tid, 1, run_id=rid, reason="worker lost", next_attempt=2)])
    assert d.gate.in_use("api") == 0  # the fold says the attempt is over: its slot is free
    d.step()
    assert d.gate.in_use("api") == 1
    (rid2, _tid2) = d.jobs[-1]
    d.fold([ev(E.WORKFLOW_CANCEL_REQUESTED, run_id=rid2, reason="stop")])
    d.step([rid2])
    d.gate.forget([d.run(rid2)])
    other = "r1" if rid2 == "r2" else "r2"
    assert d.gate.in_use("api") == 1 and d.jobs[-1][0] == other  # the next held one took the slot
    (rid3, tid3) = d.jobs[-1]
    d.fold([ev(E.TASK_FAILED, tid3, d.run(rid3).tasks[tid3].attempt, run_id=rid3, reason="x")])
    d.step([rid3])
    assert d.gate.in_use("api") == 1 and d.jobs[-1] != (rid3, tid3)


def test_set_limit_releases_as_many_as_the_new_limit_allows() -> None:
    d = Driver()
    d.fold([submitted(_limited(10, limit=2), "r1")])
    d.gate.set_limit("api", 0)
    d.step()
    assert d.gate.in_use("api") == 0 and d.gate.held("api") == 10
    d.gate.set_limit("api", 6)
    d.step([])
    assert d.gate.in_use("api") == 6
    d.gate.set_limit("api", None)  # back to the declared 2: nothing is taken back, nothing new starts
    for tid in sorted(d.dispatched("r1"))[:3]:
        d.finish("r1", tid)
    d.step([])
    assert d.gate.in_use("api") == 3


def test_templated_keys_hold_per_resolved_key() -> None:
    d = Driver()
    defs = [
        td(f"t{i}", concurrency=Concurrency("tenant:{c}", 1, {"c": "acme" if i % 2 else "globex"}))
        for i in range(6)
    ]
    d.fold([submitted(wdef(*defs), "r1")])
    d.step()
    assert d.gate.in_use("tenant:acme") == 1 and d.gate.in_use("tenant:globex") == 1
    assert d.gate.held("tenant:acme") == 2


def test_a_rebuilt_gate_has_the_same_slots_and_held_tasks() -> None:
    d = Driver()
    d.fold([submitted(_limited(7, limit=3), "r1"), submitted(_limited(2, limit=3), "r2")])
    d.step()
    fresh = Gate()
    fresh.rebuild(d.state, d.now)
    assert fresh.in_use("api") == d.gate.in_use("api") == 3
    assert fresh.held("api") == d.gate.held("api") == 6
    # And from a checkpoint of each run (held and slot round-trip).
    again = st.State(
        runs=d.state.runs.update(
            {rid: checkpoint.decode(checkpoint.encode(run)) for rid, run in d.state.runs.items()}
        )
    )
    assert again == d.state


def test_rate_limit_starts_at_most_rate_per_window_with_a_timer_for_the_next() -> None:
    d = Driver()
    defs = [td(f"t{i}", rate_limit=RateLimit("gh", 3, per=1.0)) for i in range(8)]
    d.fold([submitted(wdef(*defs), "r1")])
    d.step()
    assert len(d.jobs) == 3
    assert d.gate.next_due(d.now) == pytest.approx(101.0)  # the scheduler's timer
    d.now = 100.5
    assert d.step([]) == [] and len(d.jobs) == 3
    d.now = 101.0
    d.step([])
    assert len(d.jobs) == 6
    d.now = 102.0
    d.step([])
    assert len(d.jobs) == 8
    assert d.gate.next_due(d.now) is None  # nothing held: no timer


def test_a_new_leader_starts_no_rate_limited_task_within_per_of_its_takeover() -> None:
    gate = Gate()
    gate.rebuild(st.EMPTY, 50.0)
    state = st.fold([submitted(wdef(td("t0", rate_limit=RateLimit("gh", 3, per=2.0))), "r1")])
    assert not gate.admit(state.runs["r1"], "t0", 51.0).go  # starts before the refold are unknown
    assert gate.next_due(51.0) == pytest.approx(52.0)


def test_concurrency_and_rate_together() -> None:
    d = Driver()
    defs = [
        td(f"t{i}", concurrency=Concurrency("k", 2), rate_limit=RateLimit("r", 1, per=1.0)) for i in range(4)
    ]
    d.fold([submitted(wdef(*defs), "r1")])
    d.step()
    assert len(d.jobs) == 1 and d.gate.in_use("k") == 1  # the rate allows one start this second
    d.now += 1
    d.step([])
    assert len(d.jobs) == 2 and d.gate.in_use("k") == 2
    d.now += 1
    d.step([])
    assert len(d.jobs) == 2  # the rate allows a start, but both slots are taken
    d.finish(*d.jobs[0])
    d.step([])
    assert len(d.jobs) == 3 and d.gate.in_use("k") == 2


def test_holding_costs_o_log_n_per_event_with_100k_held() -> None:
    d = Driver()
    d.fold([submitted(_limited(100_000, limit=1), "big")])
    d.step()
    assert d.gate.held("api") == 99_999 and not d.run("big").ready
    started = time.perf_counter()
    for _ in range(200):
        rid, tid = d.jobs[-1]
        d.finish(rid, tid)
        d.step([])
    per_release = (time.perf_counter() - started) / 200
    assert d.gate.in_use("api") == 1 and d.gate.held("api") == 99_799
    # A scan of everything held would cost tens of ms per release here.
    assert per_release < 0.005, f"{per_release * 1000:.2f} ms per release"


def test_task_held_is_idempotent_and_ignored_for_stale_attempts() -> None:
    state = st.fold([submitted(_limited(2), "r1")])
    held = ev(E.TASK_HELD, "t0", 1, run_id="r1", reason="full")
    once = st.fold([held], state)
    assert st.fold([held], once) == once
    assert "t0" in once.runs["r1"].held and "t0" not in once.runs["r1"].ready
    assert st.fold([ev(E.TASK_HELD, "t1", 2, run_id="r1")], state) == state
    dispatched = st.fold([ev(E.TASK_DISPATCHED, "t0", 1, run_id="r1", slot="api")], once)
    run = dispatched.runs["r1"]
    assert "t0" not in run.held and run.tasks["t0"].slot == "api" and not run.tasks["t0"].held


def test_a_maps_elements_share_its_static_key() -> None:
    reg = _registry()

    @task(registry=reg, name="t.each", concurrency=Concurrency("each", 2))
    def each(x: int) -> int:
        return x

    wf = Workflow("mapped", registry=reg)
    wf.map(each, list(range(6)), id="m")
    d = Driver()
    d.fold([submitted(wf.definition(), "r1")])
    d.step()
    assert d.gate.in_use("each") == 2 and d.gate.held("each") == 4
    assert all(tid.startswith("m[") for _, tid in d.jobs)
