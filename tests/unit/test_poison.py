"""Poison input (issue 10, point 1): entries that are no events, submissions that are no workflows and
events a handler cannot take reject only their own run; the fold and the decisions never raise."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

from nerv_cluster import constants
from nerv_cluster import state as st
from nerv_cluster.errors import MalformedEventError, UnknownEventTypeError
from nerv_cluster.eventlog import _WARNED, _decode
from nerv_cluster.model import Event, EventType, RunStatus, TaskStatus
from scheduler.decisions import Decisions, Limits, decide, decide_isolated
from tests.unit.helpers import completes, diamond, ev, submitted, td, wdef


def _raw_submit(run_id: str, workflow: Any) -> Event:
    return Event(EventType.WORKFLOW_SUBMITTED, run_id, data={"workflow": workflow}, ts=1.0, source="client")


def _task(tid: str, *deps: str, **kw: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"id": tid, "fn": "tests.noop", **kw}
    if deps:
        out["deps"] = list(deps)
    return out


# -- decoding ----------------------------------------------------------------------------------------------


def _good() -> dict[str, Any]:
    return {"i": "e1", "t": "TASK_STARTED", "r": "run-1", "k": "a", "a": 1, "ts": 2.0, "d": {"worker": "w"}}


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[1, 2]",
        json.dumps({k: v for k, v in _good().items() if k != "r"}),  # no run id
        json.dumps({k: v for k, v in _good().items() if k != "ts"}),  # no timestamp
        json.dumps({k: v for k, v in _good().items() if k != "i"}),  # no event id
        json.dumps({**_good(), "a": "1"}),
        json.dumps({**_good(), "k": 7}),
        json.dumps({**_good(), "d": [1]}),
        json.dumps({**_good(), "ts": True}),
    ],
)
def test_malformed_entries_raise_a_malformed_event_error(raw: str) -> None:
    with pytest.raises(MalformedEventError):
        Event.parse(raw)


def test_an_unknown_event_type_is_its_own_error_and_a_good_entry_parses_like_from_json() -> None:
    with pytest.raises(UnknownEventTypeError, match="TASK_TELEPORTED"):
        Event.parse(json.dumps({**_good(), "t": "TASK_TELEPORTED"}))
    raw = json.dumps(_good())
    assert Event.parse(raw) == Event.from_json(raw)


def test_decoding_skips_bad_entries_and_warns_once_per_entry(caplog: pytest.LogCaptureFixture) -> None:
    good = json.dumps(_good())
    unknown = json.dumps({**_good(), "i": "e2", "t": "TASK_TELEPORTED"})
    entries = [
        ("1-0", {"e": "{broken"}),
        ("2-0", {"e": good}),
        ("3-0", {"x": "no event field"}),
        ("4-0", {"e": unknown}),
    ]
    _WARNED.clear()  # entries earlier tests of this process warned about are not warned about again
    with caplog.at_level(logging.WARNING, logger="nerv.eventlog"):
        first = _decode(entries)
        again = _decode(entries)  # a refold reads them all again
    assert [eid for eid, _ in first] == ["2-0"] == [eid for eid, _ in again]
    # A reader goes on after the last entry read, skipped or not (else it reads them forever).
    assert first.upto == "4-0" and _decode([]).upto == ""
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3, warnings
    assert any("newer version" in w and "TASK_TELEPORTED" in w for w in warnings)


# -- submissions that are no valid workflow ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("workflow", "why"),
    [
        ({"name": "cyc", "tasks": [_task("a", "b"), _task("b", "a")]}, "cycle"),
        ({"name": "unk", "tasks": [_task("a", "ghost")]}, "unknown task 'ghost'"),
        ({"name": "colon", "tasks": [_task("load:users")]}, "invalid task id 'load:users'"),
        ({"name": "nl", "tasks": [_task("a\nb")]}, "invalid task id"),
        ({"name": "brace", "tasks": [_task("a}b")]}, "invalid task id"),
        ({"name": "long", "tasks": [_task("a" * 129)]}, "invalid task id"),
        ({"name": "dup", "tasks": [_task("a"), _task("a")]}, "duplicate task id"),
        ({"name": "empty", "tasks": []}, "no tasks"),
        ({"name": "nofn", "tasks": [{"id": "a"}]}, "a task needs an id and a fn"),
        ({"name": "q", "tasks": [_task("a", queue="gpu")]}, "unknown queue 'gpu'"),
        ({"name": "t", "tasks": [_task("a", timeout="soon")]}, "timeout"),
        ({"name": "r", "tasks": [_task("a", retry={"max_retries": "3"})]}, "malformed field: TypeError"),
        ({"tasks": [_task("a")]}, "has no name"),
        ("not a dict", "no workflow definition"),
    ],
)
def test_an_invalid_submission_becomes_a_rejected_run_the_scheduler_fails(workflow: Any, why: str) -> None:
    bad = _raw_submit("bad-1", workflow)
    good = submitted(diamond(), run_id="good-1")
    state = st.fold([bad, good])
    bulk = st.fold_run(None, [bad])
    one = st.apply_to_run(None, bad)
    assert bulk is not None and one is not None
    assert bulk.rejected == one.rejected and why in bulk.rejected, bulk.rejected
    assert state.runs["bad-1"].rejected == bulk.rejected
    assert not state.runs["good-1"].rejected

    out = Decisions()
    decide(state.runs["bad-1"], 5.0, "scheduler:1", out)
    decide(state.runs["good-1"], 5.0, "scheduler:1", out)
    failed = [e for e in out.events if e.type is EventType.WORKFLOW_FAILED]
    assert [e.run_id for e in failed] == ["bad-1"]
    assert why in failed[0].data["reason"]
    assert {j.task_id for j, _ in out.jobs} == {"a"}  # the good run goes on

    state = st.fold(out.events, state)
    assert state.runs["bad-1"].status is RunStatus.FAILED
    result = st.run_result(state.runs["bad-1"])
    assert result.status is RunStatus.FAILED and why in result.reason
    out = Decisions()
    decide(state.runs["bad-1"], 6.0, "scheduler:1", out)
    assert out.finished == ["bad-1"] and not out.events


def test_an_invalid_run_id_rejects_the_run() -> None:
    for run_id in ("a:b", "x\ny", "{tag}", "-lead"):
        run = st.apply_to_run(None, _raw_submit(run_id, {"name": "n", "tasks": [_task("a")]}))
        assert run is not None and "invalid run id" in run.rejected, run_id
    assert not st.apply_to_run(None, _raw_submit("ok.run-1_x", {"name": "n", "tasks": [_task("a")]})).rejected  # type: ignore[union-attr]


# -- a handler that raises ---------------------------------------------------------------------------------


def test_a_handler_that_raises_rejects_only_its_run_alike_in_bulk_and_one_by_one() -> None:
    events = [
        submitted(wdef(td("a"), td("b", "a")), run_id="r1"),
        submitted(wdef(td("a")), run_id="r2"),
        ev(EventType.TASK_DISPATCHED, "a", 1, run_id="r1", queue="cpu"),
        ev(EventType.TASK_STARTED, "a", 1, run_id="r1", worker="w"),
        # next_attempt must be an int: int("soon") raises inside the handler
        ev(EventType.TASK_RETRYING, "a", 1, run_id="r1", next_attempt="soon"),
        ev(EventType.TASK_DISPATCHED, "a", 1, run_id="r2", queue="cpu"),
    ]
    one = st.EMPTY
    for e in events:
        one = st.apply(one, e)
    bulk = st.fold(events)
    for state in (one, bulk):
        assert "TASK_RETRYING of task 'a'" in state.runs["r1"].rejected
        assert "ValueError" in state.runs["r1"].rejected
        assert not state.runs["r2"].rejected
        assert state.runs["r2"].tasks["a"].dispatched
    assert one.runs["r1"].rejected == bulk.runs["r1"].rejected
    # A rejected run takes only its end: later task events change nothing.
    later = st.apply(bulk, ev(EventType.TASK_COMPLETED, "a", 1, run_id="r1", result=1))
    assert later.runs["r1"] is bulk.runs["r1"]


def test_a_run_decide_raises_for_is_failed_and_the_others_are_decided() -> None:
    # A reference to a task that is not a dependency: building its job raises KeyError. The intake
    # refuses such a definition (test_fuzz_intake), so the run's definition is changed in memory.
    state = st.fold(
        [_raw_submit("bad-1", {"name": "s", "tasks": [_task("a")]}), submitted(diamond(), run_id="good-1")]
    )
    bad = state.runs["bad-1"]
    sneaky = bad.defs["a"].__class__(id="a", fn="tests.noop", name="a", args=({constants.REF_KEY: "zz"},))
    state = st.State(runs=state.runs.set("bad-1", bad._replace(defs={"a": sneaky})))
    out = Decisions()
    for rid in ("bad-1", "good-1"):
        decide_isolated(state.runs[rid], 5.0, "scheduler:1", out)
    failed = [e for e in out.events if e.type is EventType.WORKFLOW_FAILED]
    assert [e.run_id for e in failed] == ["bad-1"] and "KeyError" in failed[0].data["reason"]
    assert all(e.run_id == "good-1" for e in out.events if e.type is not EventType.WORKFLOW_FAILED)
    assert [(j.run_id, j.task_id) for j, _ in out.jobs] == [("good-1", "a")]


# -- bounds the scheduler holds runs to (point 9) ----------------------------------------------------------


def test_a_run_over_the_task_or_submission_bound_fails_before_it_starts() -> None:
    run = st.fold([submitted(wdef(td("a"), td("b"), td("c")))]).runs["run-1"]
    assert run.submitted_bytes == len(
        json.dumps(wdef(td("a"), td("b"), td("c")).to_dict(), separators=(",", ":"))
    )
    for limits, why in (
        (Limits(max_tasks=2), "3 tasks; the limit is 2"),
        (Limits(max_submission_bytes=10), f"{run.submitted_bytes} bytes of JSON; the limit is 10"),
    ):
        out = Decisions()
        decide(run, 1.0, "s", out, limits=limits)
        assert [e.type for e in out.events] == [EventType.WORKFLOW_FAILED] and not out.jobs
        assert why in out.events[0].data["reason"]
    out = Decisions()
    decide(run, 1.0, "s", out, limits=Limits(max_tasks=3))
    assert len(out.jobs) == 3


def test_a_job_over_the_job_bound_fails_its_task_with_the_sizes_instead_of_being_sent() -> None:
    big = "x" * 3_000
    definition = wdef(
        td("a"),
        td("b"),
        td("join", "a", "b", args=({constants.REF_KEY: "a"}, {constants.REF_KEY: "b"})),
    )
    state = st.fold([submitted(definition), *completes("a", big), *completes("b", big)])
    run = state.runs["run-1"]
    out = Decisions()
    decide(run, 9.0, "s", out, limits=Limits(max_job_bytes=5_000))
    assert not out.jobs
    (failed,) = [e for e in out.events if e.type is EventType.TASK_FAILED]
    assert failed.task_id == "join"
    err = failed.data["error"]
    assert err["type"] == "PayloadTooLargeError" and "the limit is 5000" in err["message"]
    assert "bytes of JSON" in err["message"]
    state = st.fold(out.events, state)
    assert state.runs["run-1"].tasks["join"].status is TaskStatus.FAILED
    out = Decisions()
    decide(state.runs["run-1"], 10.0, "s", out, limits=Limits(max_job_bytes=5_000))
    assert [e.type for e in out.events] == [EventType.WORKFLOW_FAILED]
    # Under a bound it fits, it is sent.
    out = Decisions()
    decide(run, 9.0, "s", out, limits=Limits(max_job_bytes=7_000))
    assert [j.task_id for j, _ in out.jobs] == ["join"]


def test_small_scalar_results_still_meet_a_tiny_job_bound_and_big_ints_are_measured() -> None:
    definition = wdef(td("a"), td("join", "a", args=({constants.REF_KEY: "a"},)))
    for result in (7, 1 << 200):
        state = st.fold([submitted(definition), *completes("a", result)])
        out = Decisions()
        decide(state.runs["run-1"], 9.0, "s", out, limits=Limits(max_job_bytes=60))
        assert EventType.TASK_FAILED in [e.type for e in out.events] and not out.jobs, result
    # Under a bound that small scalars cannot reach, a 3,600-digit int is still measured, and caught.
    for result, sent in ((7, True), (1 << 12_000, False)):
        state = st.fold([submitted(definition), *completes("a", result)])
        out = Decisions()
        decide(state.runs["run-1"], 9.0, "s", out, limits=Limits(max_job_bytes=3_000))
        assert bool(out.jobs) is sent


def test_checkpoints_keep_the_rejection_and_the_submission_size() -> None:
    from nerv_cluster import checkpoint

    sound = st.fold([submitted(diamond())]).runs["run-1"]
    rejected = st.apply_to_run(None, _raw_submit("bad-1", {"name": "c", "tasks": [_task("a", "a")]}))
    assert rejected is not None and sound.submitted_bytes > 0
    for run in (sound, rejected):
        assert checkpoint.decode(json.loads(json.dumps(checkpoint.encode(run)))) == run
