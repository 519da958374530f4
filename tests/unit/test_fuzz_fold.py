"""Fuzzing events into the fold (issue 13, point 7): whatever a feed or log entry holds, decoding refuses
it with a :class:`MalformedEventError` or the fold takes it without raising; the other runs of the state
are left exactly as they were; the run it names ends up rejected, unchanged, or in a sound state (the
invariants below hold, the scheduler can decide for it, a client can read it, and it checkpoints)."""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

from hypothesis import example, given
from hypothesis import strategies as hst

from nerv_cluster import checkpoint
from nerv_cluster import state as st
from nerv_cluster.errors import MalformedEventError
from nerv_cluster.model import Event, EventType, TaskError, TaskStatus, WorkflowDef
from scheduler.decisions import Decisions, decide
from tests import fuzzing
from tests.unit.helpers import completes, diamond, fails, submitted, td, wdef

VICTIM = "victim"


def _others() -> st.State:
    """Two sound runs part way through: a diamond with its root done, a chain with a failed step."""
    events = [
        submitted(diamond(), run_id="other-a"),
        *[Event(e.type, "other-a", e.task_id, e.attempt, e.data, ts=e.ts) for e in completes("a", 1)],
        submitted(wdef(td("x"), td("y", "x"), td("z", "y", trigger="all_done")), run_id="other-b"),
        *[Event(e.type, "other-b", e.task_id, e.attempt, e.data, ts=e.ts) for e in fails("x")],
    ]
    return st.fold(events)


OTHERS = _others()


def _number(value: Any) -> bool:
    return value is None or (isinstance(value, int | float) and not isinstance(value, bool))


def check_run(run: st.RunState) -> None:
    """The invariants of a sound run's state: what the fold keeps must agree with itself, and every
    field must have the type the scheduler and the clients read it as."""
    assert set(run.tasks) == set(run.defs)
    counts = Counter(ts.status for ts in run.tasks.values())
    assert run.tally == tuple(counts.get(s, 0) for s in TaskStatus), "the tally disagrees with the tasks"
    for tid, ts in run.tasks.items():
        where = f"task {tid!r}: {ts}"
        assert isinstance(ts.status, TaskStatus), where
        assert type(ts.attempt) is int and ts.attempt >= 1, where
        assert type(ts.first) is int and 1 <= ts.first <= ts.attempt, where
        for value in (ts.dispatched_at, ts.started_at, ts.finished_at, ts.due_at):
            assert _number(value), where
        assert ts.due_at is None or not math.isnan(ts.due_at), where
        for text in (ts.worker, ts.via, ts.child, ts.slot, ts.cache_key, ts.cached_from):
            assert text is None or isinstance(text, str), where
        assert isinstance(ts.reason, str), where
        if ts.error is not None:
            e = ts.error
            assert isinstance(e, TaskError), where
            assert all(isinstance(x, str) for x in (e.type, e.message, e.traceback, *e.types)), where
    status = {tid: ts.status for tid, ts in run.tasks.items()}
    for tid in run.ready:
        assert status[tid] is TaskStatus.READY and not run.tasks[tid].dispatched, tid
    for tid in run.queued:
        assert status[tid] is TaskStatus.READY and run.tasks[tid].dispatched, tid
    for tid in run.running:
        assert status[tid] is TaskStatus.RUNNING, tid
    assert set(run.waiting) == {t for t, s in status.items() if s is TaskStatus.WAITING}
    for tid in run.held:
        assert status[tid] is TaskStatus.READY, tid


def check_usable(run: st.RunState) -> None:
    """A sound run can be decided for, read by a client, and checkpointed (decode(encode) is itself)."""
    check_run(run)
    decide(run, 1e9, "scheduler:test", Decisions())
    result = st.run_result(run)
    for t in result.tasks.values():
        _ = t.execution_time
    text = json.dumps(checkpoint.encode(run))  # compared as text: a NaN argument is not equal to itself
    assert json.dumps(checkpoint.encode(checkpoint.decode(json.loads(text)))) == text


@hst.composite
def victims(draw: hst.DrawFn) -> tuple[st.State, list[str]]:
    """OTHERS plus a sound victim run of a drawn definition, some of its roots done."""
    raw = draw(fuzzing.definitions(max_tasks=4))
    definition = WorkflowDef.from_dict(raw)
    events = [Event(EventType.WORKFLOW_SUBMITTED, VICTIM, data={"workflow": raw}, ts=1.0)]
    roots = [t.id for t in definition.tasks if not t.dependencies and t.over is None and t.wait is None]
    for tid in draw(hst.lists(hst.sampled_from(roots), unique=True)) if roots else []:
        events += [Event(e.type, VICTIM, e.task_id, e.attempt, e.data, ts=e.ts) for e in completes(tid, 7)]
    state = st.fold(events, OTHERS)
    return state, [t.id for t in definition.tasks]


def _feed(state: st.State, raws: list[Any]) -> tuple[st.State, list[Event]]:
    """Decode and fold ``raws`` one by one, as the scheduler does with its feed: refused entries skipped."""
    taken = []
    for n, raw in enumerate(raws):
        try:
            ev = Event.parse(raw, logged_at=100.0 + n)
        except MalformedEventError:
            continue
        taken.append(ev)
        state = st.apply(state, ev)
    return state, taken


def _assert_contained(before: st.State, after: st.State, touched: set[str]) -> None:
    for rid, run in before.runs.items():
        if rid not in touched:
            assert after.runs[rid] is run, f"run {rid} changed"
    for rid in touched:
        run, old = after.runs.get(rid), before.runs.get(rid)
        if run is None or run is old or run.rejected:
            continue
        check_usable(run)
        for tid, was in old.tasks.items() if old is not None else ():
            now = run.tasks[tid]
            # Attempts only go forward: an attempt sent again under its old number would find its
            # outcome slot taken (or a stale outcome of it accepted), and the task never end.
            assert now.attempt >= was.attempt, (tid, was, now)
            if was.dispatched and now.status is TaskStatus.READY and not now.dispatched:
                assert now.attempt > was.attempt, (tid, was, now)


@fuzzing.examples(70)
@given(victims(), hst.data())
def test_fuzzed_events_never_raise_and_touch_only_their_run(
    case: tuple[st.State, list[str]], data: Any
) -> None:
    state, task_ids = case
    run_id = data.draw(hst.sampled_from([VICTIM, VICTIM, "made-up"]))
    raws = data.draw(hst.lists(fuzzing.event_inputs(run_id, task_ids or ["t0"]), min_size=1, max_size=5))
    after, taken = _feed(state, raws)
    _assert_contained(state, after, {VICTIM, "made-up"})
    # The bulk path (a refold, a big batch) decides alike.
    assert st.fold(taken, state) == after


def _victim() -> tuple[st.State, Event]:
    state = st.fold([submitted(wdef(td("a"), td("b", "a")), run_id=VICTIM)], OTHERS)
    dispatched = Event(EventType.TASK_DISPATCHED, VICTIM, "a", 1, {"queue": "cpu"}, ts=2.0)
    started = Event(EventType.TASK_STARTED, VICTIM, "a", 1, {"worker": "w1"}, ts=3.0)
    return st.fold([dispatched, started], state), started


@fuzzing.examples(150)
@given(
    hst.sampled_from(
        ["TASK_COMPLETED", "TASK_FAILED", "TASK_RETRYING", "TASK_PENDING", "TASK_STARTED", "TASK_SPAWNED"]
    ),
    hst.dictionaries(
        hst.sampled_from(
            [
                "result",
                "worker",
                "started_at",
                "error",
                "reason",
                "delay",
                "due_at",
                "next_attempt",
                "counted",
                "fresh",
                "via",
                "batch",
                "workflow",
                "handoff",
                "cached",
                "cached_from",
            ]
        ),
        fuzzing.odd_values(),
        max_size=4,
    ),
)
# Found by this fuzzer: each left a value of the wrong type in the run's state (a client reading the
# run, the watchdog or a checkpoint then raised), an attempt moved back or not forward (its outcome slot
# taken: the task could never end), or a NaN retry time (never due: the task never ran again).
@example("TASK_COMPLETED", {"started_at": "soon"})
@example("TASK_COMPLETED", {"worker": 5})
@example("TASK_FAILED", {"error": {"type": 1, "message": [], "types": "ab"}})
@example("TASK_FAILED", {"started_at": [1]})
@example("TASK_RETRYING", {"next_attempt": 1})
@example("TASK_RETRYING", {"next_attempt": -3})
@example("TASK_RETRYING", {"delay": float("nan")})
@example("TASK_STARTED", {"via": 5})
@example("TASK_SPAWNED", {"workflow": {}, "started_at": "x"})
def test_odd_data_in_an_event_of_the_current_attempt(kind: str, data: dict[str, Any]) -> None:
    """The hardest case: an event that names the running attempt exactly, its data odd."""
    state, _ = _victim()
    raw = json.dumps({"i": "x1", "t": kind, "r": VICTIM, "k": "a", "a": 1, "ts": 4.0, "d": data})
    after, taken = _feed(state, [raw])
    _assert_contained(state, after, {VICTIM})
    assert st.fold(taken, state) == after


@fuzzing.examples(100)
@given(fuzzing.event_inputs(VICTIM, ["a", "b"]))
# Found by this fuzzer: Event.parse raised TypeError (an unhashable type field) and RecursionError
# (deep nesting) instead of MalformedEventError; readers caught them only by catching everything.
@example('{"i": "0", "t": [], "r": "victim", "ts": 0.0}')
@example("[" * 100_000)
def test_any_entry_parses_to_an_event_or_is_refused(raw: Any) -> None:
    try:
        ev = Event.parse(raw, logged_at=1.0, cursor="1-0")
    except MalformedEventError as exc:
        assert str(exc)
        return
    assert isinstance(ev.type, EventType) and isinstance(ev.run_id, str) and isinstance(ev.data, dict)
