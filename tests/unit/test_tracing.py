"""Spans of runs and attempts built from event sequences (scheduler/tracing.py), and their export
through the OpenTelemetry SDK to its in-memory exporter."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from nerv_cluster.model import Event, EventType
from nerv_cluster.settings import Settings
from nerv_cluster.state import EMPTY, State, apply, fold
from scheduler import otel_export, tracing
from scheduler.tracing import SpanBuilder, SpanRecord, attempt_span_id, run_span_id, trace_id_of
from tests.unit.helpers import RUN, Sim, diamond, ev, random_dag, submitted, td, wdef

E = EventType


def _logged(events: Sequence[Event], skew: float = 1000.0) -> list[Event]:
    """The events as the scheduler reads them from the feed: dated by the log (``logged_at``), here a
    clock ``skew`` seconds ahead of the writers'."""
    return [dataclasses.replace(e, logged_at=e.ts + skew) for e in events]


def _build(
    events: Sequence[Event],
    rng: random.Random | None = None,
    builder: SpanBuilder | None = None,
    state: State = EMPTY,
) -> tuple[list[SpanRecord], State]:
    """Feed ``events`` to a builder in batches (random sizes with ``rng``), each observed with the
    state folded through its batch, as the scheduler loop does."""
    builder = builder or SpanBuilder()
    out: list[SpanRecord] = []
    i = 0
    while i < len(events):
        n = rng.randint(1, 7) if rng is not None else 1
        batch = events[i : i + n]
        for e in batch:
            state = apply(state, e)
        out += builder.observe(batch, state)
        i += n
    return out, state


def _by_attempt(records: list[SpanRecord]) -> dict[tuple[str, int], SpanRecord]:
    return {
        (str(r.attributes["nerv.task_id"]), int(r.attributes["nerv.attempt"])): r
        for r in records
        if "nerv.task_id" in r.attributes
    }


def test_each_attempt_is_a_span_under_its_run_span_linked_to_its_dependencies():
    sim = Sim(diamond(), random.Random(1))
    sim.run_to_end()
    log = _logged(sim.log)
    records, _ = _build(log)
    runs = [r for r in records if "nerv.task_id" not in r.attributes]
    attempts = _by_attempt(records)
    assert len(runs) == 1 and set(attempts) == {("a", 1), ("b", 1), ("c", 1), ("d", 1)}
    run = runs[0]
    assert run.trace_id == trace_id_of(RUN) and run.span_id == run_span_id(RUN, 0) and run.parent_id is None
    assert run.attributes["nerv.status"] == "COMPLETED" and run.ok is True
    assert run.name == "run diamond"
    for (tid, n), span in attempts.items():
        assert span.trace_id == run.trace_id and span.parent_id == run.span_id
        assert span.span_id == attempt_span_id(RUN, tid, n)
        assert span.attributes["nerv.queue"] == "cpu" and span.attributes["nerv.worker"] == "w1"
        assert span.attributes["nerv.status"] == "COMPLETED" and span.ok is True
        # Times are the log's: the start is TASK_STARTED's logged time, the end the completion's.
        started = next(e for e in log if e.type is E.TASK_STARTED and e.task_id == tid)
        done = next(e for e in log if e.type is E.TASK_COMPLETED and e.task_id == tid)
        assert (span.start, span.end) == (started.logged_at, done.logged_at)
        assert run.start <= span.start <= span.end <= run.end
    assert attempts["a", 1].links == ()
    assert set(attempts["d", 1].links) == {attempt_span_id(RUN, "b", 1), attempt_span_id(RUN, "c", 1)}
    assert attempts["b", 1].links == (attempt_span_id(RUN, "a", 1),)


def test_a_lost_attempt_and_a_retried_one_each_have_a_span_and_dependents_link_the_last():
    sim = Sim(diamond(), random.Random(2), lose_first=["b"], fail_first=["c"])
    sim.run_to_end()
    records, _ = _build(_logged(sim.log), random.Random(3))
    attempts = _by_attempt(records)
    assert set(attempts) == {("a", 1), ("b", 1), ("b", 2), ("c", 1), ("c", 2), ("d", 1)}
    lost, retried = attempts["b", 1], attempts["c", 1]
    assert lost.attributes["nerv.status"] == "LOST" and lost.ok is False
    assert lost.attributes["nerv.reason"] == "worker lost"
    assert retried.attributes["nerv.status"] == "RETRYING" and retried.ok is False
    assert retried.error == "ValueError: flaky" and retried.attributes["nerv.error"] == "ValueError: flaky"
    assert attempts["b", 2].attributes["nerv.status"] == "COMPLETED"
    assert lost.end <= attempts["b", 2].start, "the retry starts after the lost attempt ended"
    assert set(attempts["d", 1].links) == {attempt_span_id(RUN, "b", 2), attempt_span_id(RUN, "c", 2)}


def test_a_failed_run_and_a_task_that_failed_for_good():
    sim = Sim(wdef(td("a"), td("b", "a")), random.Random(4), fail_always=["a"])
    sim.run_to_end()
    records, _ = _build(_logged(sim.log))
    attempts = _by_attempt(records)
    assert set(attempts) == {("a", 1)}, "a skipped task has no attempt, so no span"
    assert attempts["a", 1].attributes["nerv.status"] == "FAILED"
    assert attempts["a", 1].error == "ValueError: a broke"
    (run,) = [r for r in records if "nerv.task_id" not in r.attributes]
    assert run.attributes["nerv.status"] == "FAILED" and run.ok is False


def test_late_and_repeated_end_events_emit_no_second_span():
    wf = wdef(td("a"))
    events = [
        submitted(wf),
        ev(E.WORKFLOW_STARTED),
        ev(E.TASK_DISPATCHED, "a", 1),
        ev(E.TASK_STARTED, "a", 1, worker="w1"),
        ev(E.TASK_PENDING, "a", 1, next_attempt=2, reason="worker lost"),
        # The lost worker was only slow: its completion of attempt 1 comes late, twice.
        ev(E.TASK_COMPLETED, "a", 1, result=1, worker="w1"),
        ev(E.TASK_COMPLETED, "a", 1, result=1, worker="w1"),
        ev(E.TASK_DISPATCHED, "a", 2),
        ev(E.TASK_STARTED, "a", 2, worker="w2"),
        ev(E.TASK_COMPLETED, "a", 2, result=1, worker="w2"),
        ev(E.TASK_COMPLETED, "a", 2, result=1, worker="w2"),
        ev(E.WORKFLOW_COMPLETED),
        ev(E.WORKFLOW_COMPLETED),
    ]
    records, _ = _build(events)
    assert [(r.attributes["nerv.status"], r.attributes.get("nerv.attempt")) for r in records] == [
        ("LOST", 1),
        ("COMPLETED", 2),
        ("COMPLETED", None),
    ]
    assert records[1].attributes["nerv.worker"] == "w2"


def test_a_cache_hit_is_a_span_of_no_length_and_an_unended_attempt_ends_with_its_run():
    wf = wdef(td("hit"), td("slow"))
    events = [
        submitted(wf),
        ev(E.WORKFLOW_STARTED),
        ev(E.CACHE_HITS, hits=[["hit", 1, 1, "r0/hit"]]),  # as the scheduler logs hits
        ev(E.TASK_DISPATCHED, "slow", 1),
        ev(E.TASK_STARTED, "slow", 1, worker="w1"),
        ev(E.WORKFLOW_CANCEL_REQUESTED),
        ev(E.WORKFLOW_CANCELLED),
    ]
    records, _ = _build(events)
    attempts = _by_attempt(records)
    hit = attempts["hit", 1]
    assert hit.start == hit.end and hit.attributes["nerv.cached"] is True
    assert attempts["slow", 1].attributes["nerv.status"] == "CANCELLED"
    assert attempts["slow", 1].end == events[-1].ts


def test_a_closed_run_leaves_no_record():
    builder = SpanBuilder()
    events = [submitted(wdef(td("a"))), ev(E.WORKFLOW_STARTED), ev(E.TASK_DISPATCHED, "a", 1)]
    _build(events, builder=builder)
    assert RUN in builder.runs and "a" in builder.runs[RUN].open
    builder.forget([RUN])
    assert builder.runs == {}


def test_a_child_run_is_in_its_root_runs_trace_under_the_attempt_that_returned_it():
    child = wdef(td("x"), name="child")
    child = dataclasses.replace(
        child, meta={"parent": {"run": RUN, "task": "a", "attempt": 2}, "root": RUN, "depth": 1}
    )
    events = [submitted(child, "child-1"), ev(E.WORKFLOW_STARTED, run_id="child-1")]
    events += [
        ev(E.TASK_DISPATCHED, "x", 1, run_id="child-1"),
        ev(E.TASK_STARTED, "x", 1, run_id="child-1", worker="w1"),
        ev(E.TASK_COMPLETED, "x", 1, run_id="child-1", result=3, worker="w1"),
        ev(E.WORKFLOW_COMPLETED, run_id="child-1"),
    ]
    records, _ = _build(events)
    x, run = records
    assert run.trace_id == x.trace_id == trace_id_of(RUN)
    assert run.parent_id == attempt_span_id(RUN, "a", 2) and x.parent_id == run_span_id("child-1")


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_a_new_leader_rebuilt_from_the_refolded_state_emits_the_same_spans(seed):
    """A failover at any point: the spans the new leader emits are exactly those the old one would
    have emitted from there on, same ids, same times, same attributes."""
    rng = random.Random(seed)
    wf = random_dag(40, rng, triggers=True)
    tids = [t.id for t in wf.tasks]
    sim = Sim(
        wf,
        rng,
        lose_first=rng.sample(tids, 5),
        fail_first=rng.sample(tids, 5),
        fail_always=rng.sample(tids, 2),
        takeover=rng.sample(tids, 3),
    )
    sim.run_to_end()
    log = _logged(sim.log)
    whole, _ = _build(log)
    assert len({r.span_id for r in whole}) == len(whole), "every span once"
    for cut in sorted(rng.sample(range(1, len(log)), 8)):
        before, after = log[:cut], log[cut:]
        emitted_before, _ = _build(before)
        new_leader = SpanBuilder()
        new_leader.rebuild(fold(before))  # what takeover.refold gives the new leader
        emitted_after, _ = _build(after, builder=new_leader, state=fold(before))
        assert emitted_before + emitted_after == whole, f"cut at {cut}"


def _cpu_run() -> list[Event]:
    sim = Sim(diamond(), random.Random(8), lose_first=["b"])
    sim.run_to_end()
    return _logged(sim.log)


def test_tracing_hands_the_spans_to_the_sdk_with_their_ids_times_links_and_status():
    exporter = InMemorySpanExporter()
    tr = otel_export.Tracing(otel_export.provider(exporter, batch=False, service_name="nerv-test"))
    log = _cpu_run()
    state = EMPTY
    for e in log:
        state = apply(state, e)
        tr.observe([e], state)
    spans = exporter.get_finished_spans()
    expected, _ = _build(log)
    assert [s.context.span_id for s in spans] == [r.span_id for r in expected]
    by_id = {s.context.span_id: s for s in spans}
    run = by_id[run_span_id(RUN)]
    assert run.parent is None and run.context.trace_id == trace_id_of(RUN)
    assert run.resource.attributes["service.name"] == "nerv-test"
    for rec in expected:
        span = by_id[rec.span_id]
        assert span.context.trace_id == rec.trace_id
        assert span.name == rec.name
        assert (span.parent.span_id if span.parent else None) == rec.parent_id
        assert span.start_time == int(rec.start * 1e9) and span.end_time == int(rec.end * 1e9)
        assert dict(span.attributes or {}) == dict(rec.attributes)
        assert [link.context.span_id for link in span.links] == list(rec.links)
        assert all(link.context.trace_id == rec.trace_id for link in span.links)
    lost = by_id[attempt_span_id(RUN, "b", 1)]
    assert lost.status.status_code is StatusCode.ERROR and lost.attributes["nerv.status"] == "LOST"
    assert by_id[attempt_span_id(RUN, "b", 2)].status.status_code is StatusCode.OK
    tr.shutdown()


def test_tracing_is_off_unless_asked_for_and_then_exports_over_otlp():
    assert not tracing.enabled(Settings(), {})
    assert tracing.from_settings(Settings(), {}) is None
    assert tracing.enabled(Settings(), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing.enabled(Settings(), {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://h:4318/v1/traces"})
    assert tracing.enabled(Settings.from_env({"NERV_OTEL": "1"}), {})
    on = tracing.from_settings(Settings(otel=True), {})
    assert on is not None
    on.shutdown()


def test_odd_worker_data_and_a_failing_builder_never_reach_the_loop(caplog: pytest.LogCaptureFixture):
    wf = wdef(td("a"))
    events = [
        submitted(wf),
        ev(E.WORKFLOW_STARTED),
        ev(E.TASK_DISPATCHED, "a", 1),
        ev(E.TASK_STARTED, "a", 1, worker=["not", "a", "name"]),
        ev(E.TASK_FAILED, "a", 1, error="not a dict", worker={"x": 1}, reason=7),
    ]
    records, _ = _build(events)
    assert [r.attributes["nerv.status"] for r in records] == ["FAILED"]
    assert records[0].attributes["nerv.worker"] == "{'x': 1}" and records[0].attributes["nerv.reason"] == "7"

    exporter = InMemorySpanExporter()
    tr = otel_export.Tracing(otel_export.provider(exporter, batch=False))

    def broken(events, state):
        raise RuntimeError("a bug")

    tr.builder.observe = broken  # type: ignore[method-assign]
    tr.observe(events, fold(events))  # logged, not raised
    assert "tracing: could not build or emit spans" in caplog.text
    tr.shutdown()
