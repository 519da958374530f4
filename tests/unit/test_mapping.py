"""Map (``Workflow.map``): building map nodes, the fold of MAP_EXPANDED, the scheduler's map decisions,
refold and checkpoint equality with elements, and what expanding costs."""

from __future__ import annotations

import functools
import json
import random
from typing import Any

import pytest
from pyrsistent import pmap

from nerv_cluster import checkpoint, mapping
from nerv_cluster.errors import WorkflowError
from nerv_cluster.intake import accept
from nerv_cluster.jobs import build_job
from nerv_cluster.model import Event, EventType, RunStatus, TaskDef, TaskStatus, WorkflowDef
from nerv_cluster.state import EMPTY, RunState, State, apply, apply_to_run, fold, fold_run, run_result
from nerv_cluster.workflow import Workflow
from scheduler.decisions import Decisions, Limits, decide
from tests.unit.helpers import RUN, Sim, completes, ev, fails, mix, submitted

E = EventType
S = TaskStatus


def _wf(build: Any) -> WorkflowDef:
    wf = Workflow("maps")
    build(wf)
    return wf.definition()


def crawl(n_over: Any = None) -> WorkflowDef:
    """src -> m (map over src, extra args) -> total."""

    def build(wf: Workflow) -> None:
        src = wf.add("sim.range", 3, id="src")
        m = wf.map("sim.mix", src if n_over is None else n_over, args=[5], kwargs={"k": 1}, id="m")
        wf.add("sim.mix", m, id="total")

    return _wf(build)


def step(run: RunState, now: float = 10.0, limits: Limits | None = None) -> Decisions:
    out = Decisions()
    decide(run, now, "scheduler:1", out, limits=limits or Limits())
    return out


def started(definition: WorkflowDef) -> list[Event]:
    return [submitted(definition), ev(E.WORKFLOW_STARTED)]


def fold_in(run: RunState | None, events: list[Event]) -> RunState:
    for e in events:
        run = apply_to_run(run, e)
    assert run is not None
    return run


def expanded_run(result: Any = None) -> tuple[RunState, Decisions]:
    """``crawl`` with src completed (with ``result``) and the decisions that follow."""
    run = fold_in(None, [*started(crawl()), *completes("src", [10, 20, 30] if result is None else result)])
    return run, step(run)


# -- building ---------------------------------------------------------------------------------------


def test_map_builds_a_map_node():
    d = crawl()
    m = next(t for t in d.tasks if t.id == "m")
    assert m.over == {"__nerv_ref__": "src"}
    assert m.dependencies == ("src",)
    assert m.args == (5,) and dict(m.kwargs) == {"k": 1}
    assert TaskDef.from_dict(json.loads(json.dumps(m.to_dict()))) == m
    total = next(t for t in d.tasks if t.id == "total")
    assert total.dependencies == ("m",)


def test_map_over_a_literal_list_with_handles_in_it():
    def build(wf: Workflow) -> None:
        a = wf.add("sim.mix", 1, id="a")
        wf.map("sim.mix", [a, 2, {"x": [3]}], id="m", dependencies=["a"], priority="high", retry=None)

    m = _wf(build).tasks[1]
    assert m.over == [{"__nerv_ref__": "a"}, 2, {"x": [3]}]
    assert m.dependencies == ("a",)


@pytest.mark.parametrize(
    "over, message",
    [(5, "expected a task handle"), ({"a": 1}, "expected a task handle"), ([object()], "not JSON")],
)
def test_map_refuses_what_it_cannot_map_over(over, message):
    wf = Workflow("bad")
    with pytest.raises(WorkflowError, match=message):
        wf.map("sim.mix", over)
    assert len(wf) == 0  # nothing added
    with pytest.raises(WorkflowError, match="args"):
        wf.map("sim.mix", [1], args="ab")
    with pytest.raises(WorkflowError, match="map a @task that returns a Workflow"):
        wf.map(Workflow("sub"), [1])


def test_intake_refuses_a_malformed_map_node():
    raw = crawl().to_dict()
    raw["tasks"][1]["over"] = {"__nerv_ref__": "total"}  # not among its dependencies
    with pytest.raises(WorkflowError, match="not among its dependencies"):
        accept(RUN, raw)
    raw["tasks"][1]["over"] = "abc"
    with pytest.raises(WorkflowError, match="maps over a task reference or a list"):
        accept(RUN, raw)


# -- expansion ----------------------------------------------------------------------------------------


def test_a_ready_map_node_is_expanded_not_dispatched():
    run, out = expanded_run()
    assert [(e.type, e.task_id, dict(e.data)) for e in out.events] == [(E.MAP_EXPANDED, "m", {"width": 3})]
    assert out.jobs == []
    run = fold_in(run, out.events)
    assert run.tasks["m"].status is S.RUNNING and "m" not in run.running and "m" not in run.ready
    assert run.total == 6 and list(run.defs) == ["src", "m", "total", "m[0]", "m[1]", "m[2]"]
    assert run.count(S.READY) == 3 and run.count(S.RUNNING) == 1
    e1 = run.defs["m[1]"]
    assert (e1.fn, e1.args, dict(e1.kwargs), e1.dependencies, e1.over) == (
        "sim.mix",
        (20, 5),
        {"k": 1},
        (),
        None,
    )
    assert run.plan.dependents["m[1]"] == ("m",)
    assert run.plan.rank["m"] < run.plan.rank["m[0]"] < run.plan.rank["m[2]"] < run.plan.rank["total"]
    out = step(run)
    assert [job.task_id for job, _ in out.jobs] == ["m[0]", "m[1]", "m[2]"]
    assert out.jobs[2][0].args == [30, 5] and out.jobs[2][0].kwargs == {"k": 1}
    # Applying the expansion again changes nothing.
    again = fold_in(run, step(fold_in(None, [*started(crawl()), *completes("src", [10, 20, 30])])).events)
    assert again is run or again == run


def test_elements_gather_into_the_map_and_its_result_is_theirs_in_order():
    run, out = expanded_run()
    run = fold_in(run, out.events)
    for i in (2, 0, 1):
        run = fold_in(run, completes(f"m[{i}]", 100 + i))
        assert "m" not in run.gathered or i == 1
    assert run.gathered == pmap({"m": True})
    out = step(run)
    assert [(e.type, e.task_id, dict(e.data)) for e in out.events] == [
        (E.TASK_COMPLETED, "m", {"elements": 3})
    ]
    run = fold_in(run, out.events)
    assert run.tasks["m"].status is S.COMPLETED and not run.gathered
    assert mapping.result_of(run, "m") == [100, 101, 102]
    assert run.tasks["m"].result is None  # computed from the elements, not stored twice
    job = build_job(run, "total")
    assert job.args == [[100, 101, 102]]
    assert run_result(run).tasks["m"].result == [100, 101, 102]
    run = fold_in(run, completes("total", 7))
    out = step(run)
    assert [e.type for e in out.events] == [E.WORKFLOW_COMPLETED]


def test_an_empty_list_gives_an_empty_result_at_once():
    run, out = expanded_run([])
    run = fold_in(run, out.events)
    assert run.gathered == pmap({"m": True}) and run.total == 3
    run = fold_in(run, step(run).events)
    assert run.tasks["m"].status is S.COMPLETED
    out = step(run)
    assert [job.args for job, _ in out.jobs] == [[[]]]


@pytest.mark.parametrize(
    "result, limits, message",
    [
        (5, Limits(), "result of 'src', which is int, not a list"),
        ({"a": 1}, Limits(), "which is dict, not a list"),
        (None, None, "which is null, not a list"),
        ([1, 2, 3], Limits(max_map_width=2), "3 elements; the limit is 2 (NERV_MAX_MAP_WIDTH)"),
        ([1, 2, 3], Limits(max_tasks=5), "the limit is 5 (NERV_MAX_TASKS)"),
    ],
)
def test_a_map_that_cannot_expand_fails_with_a_clear_error(result, limits, message):
    run = fold_in(None, [*started(crawl()), *completes("src", result)])
    out = step(run, limits=limits)
    [failed] = out.events
    assert failed.type is E.TASK_FAILED and failed.task_id == "m"
    assert failed.data["error"]["type"] == "MapError" and message in failed.data["error"]["message"]
    run = fold_in(run, out.events)
    run = fold_in(run, step(run).events)  # total is skipped
    assert run.tasks["total"].status is S.SKIPPED and run.total == 3
    run = fold_in(run, step(run).events)
    assert run.status is RunStatus.FAILED and "MapError" in run.reason


def test_a_failed_element_fails_the_map_naming_it():
    run, out = expanded_run()
    run = fold_in(run, out.events)
    run = fold_in(run, [*completes("m[0]", 1), *fails("m[1]", "bad page"), *completes("m[2]", 3)])
    [end] = step(run).events
    assert end.type is E.TASK_FAILED and end.task_id == "m"
    assert "element 'm[1]' is FAILED: ValueError: bad page" in end.data["error"]["message"]
    run = fold_in(run, [end])
    run = fold_in(run, step(run).events)
    assert run.tasks["total"].status is S.SKIPPED
    run = fold_in(run, step(run).events)
    assert run.status is RunStatus.FAILED
    assert run.reason.startswith("task 'm' failed: MapError: map 'm': element 'm[1]' is FAILED")


def test_an_all_done_reducer_takes_the_results_with_none_for_failed_elements():
    def build(wf: Workflow) -> None:
        m = wf.map("sim.mix", [1, 2], id="m")
        wf.add("sim.mix", m, id="total", trigger="all_done")

    run = fold_in(None, [*started(_wf(build))])
    run = fold_in(run, step(run).events)  # started + expanded at once: a literal list
    assert run.tasks["m"].status is S.RUNNING
    run = fold_in(run, [*completes("m[0]", 4), *fails("m[1]")])
    run = fold_in(run, step(run).events)
    assert run.tasks["m"].status is S.FAILED
    [(job, _)] = step(run).jobs
    assert job.args == [[4, None]]
    run = fold_in(run, [*step(run).events, *completes("total", 0)])
    run = fold_in(run, step(run).events)
    assert run.status is RunStatus.COMPLETED  # the map's failure was handled by its all_done reducer


def map_over_map() -> WorkflowDef:
    def build(wf: Workflow) -> None:
        x = wf.add("sim.mix", 1, id="x")
        src = wf.add("sim.range", 3, id="src")
        a = wf.map("sim.mix", src, id="a")
        b = wf.map("sim.mix", a, args=[x], id="b")
        wf.add("sim.mix", b, id="total")

    return _wf(build)


def test_a_map_over_a_map_goes_element_wise():
    run = fold_in(None, [*started(map_over_map()), *completes("x", 9), *completes("src", [0, 1, 2])])
    out = step(run)
    assert [(e.type, e.task_id) for e in out.events] == [(E.MAP_EXPANDED, "a")]
    run = fold_in(run, out.events)
    assert run.tasks["b"].status is S.READY  # a's expansion met b's dependency on a
    out = step(run)
    assert (E.MAP_EXPANDED, "b") in [(e.type, e.task_id) for e in out.events]
    run = fold_in(run, out.events)
    assert run.tasks["b"].status is S.RUNNING
    assert [run.tasks[f"b[{i}]"].status for i in range(3)] == [S.PENDING] * 3
    assert run.defs["b[1]"].dependencies == ("a[1]", "x")
    assert run.defs["b[1]"].args == ({"__nerv_ref__": "a[1]"}, {"__nerv_ref__": "x"})
    assert run.plan.dependents["a[1]"] == ("a", "b[1]")
    assert run.plan.dependents["a"] == ()  # b was settled by a's expansion, not by its end
    run = fold_in(run, completes("a[1]", 11))
    assert [run.tasks[f"b[{i}]"].status for i in range(3)] == [S.PENDING, S.READY, S.PENDING]
    assert build_job(run, "b[1]").args == [11, 9]
    # a[0] fails: b[0] is skipped; a and b fail; total is skipped.
    run = fold_in(run, [*fails("a[0]"), *completes("a[2]", 12), *completes("b[1]", 1)])
    run = fold_in(run, step(run).events)
    assert run.tasks["a"].status is S.FAILED and run.tasks["b[0]"].status is S.SKIPPED
    run = fold_in(run, [*step(run).events, *completes("b[2]", 2)])
    run = fold_in(run, step(run).events)
    assert run.tasks["b"].status is S.FAILED
    run = fold_in(run, step(run).events)
    run = fold_in(run, step(run).events)
    assert run.tasks["total"].status is S.SKIPPED and run.status is RunStatus.FAILED


def test_a_map_over_a_failed_map_that_never_expanded_is_skipped():
    run = fold_in(None, [*started(map_over_map()), *completes("x", 9), *completes("src", 4)])
    run = fold_in(run, step(run).events)  # a fails: 4 is no list
    run = fold_in(run, step(run).events)
    assert run.tasks["a"].status is S.FAILED and run.tasks["b"].status is S.SKIPPED


def test_a_map_taking_another_maps_whole_result_waits_for_its_end():
    def build(wf: Workflow) -> None:
        a = wf.map("sim.mix", [1, 2], id="a")
        wf.map("sim.mix", a, args=[a], id="b")

    run = fold_in(None, [*started(_wf(build))])
    run = fold_in(run, step(run).events)
    assert run.tasks["b"].status is S.PENDING  # not element-wise: b needs all of a
    run = fold_in(run, [*completes("a[0]", 5), *completes("a[1]", 6)])
    run = fold_in(run, step(run).events)
    assert run.tasks["a"].status is S.COMPLETED and run.tasks["b"].status is S.READY
    run = fold_in(run, step(run).events)
    assert run.defs["b[1]"].args == (6, {"__nerv_ref__": "a"})
    assert build_job(run, "b[1]").args == [6, [5, 6]]


def test_cancel_cancels_elements_and_revokes_no_map_node_job():
    run, out = expanded_run()
    run = fold_in(
        run, [*out.events, Event(E.WORKFLOW_CANCEL_REQUESTED, RUN, data={"reason": "stop"}, ts=50.0)]
    )
    out = step(run)
    assert "m" not in " ".join(out.revoke)
    run = fold_in(run, out.events)
    assert run.status is RunStatus.CANCELLED
    assert {run.tasks[f"m[{i}]"].status for i in range(3)} == {S.CANCELLED}


# -- expansion costs O(width), never O(size of the run) ------------------------------------------------


def test_expansion_shares_the_static_graph():
    run = fold_in(None, [*started(crawl()), *completes("src", list(range(50)))])
    static_defs, static_deps = run.defs, run.plan.dependents
    run = fold_in(run, step(run).events)
    assert isinstance(run.defs, mapping.GrownDefs) and run.defs.static is static_defs
    assert isinstance(run.plan.dependents, mapping.GrownDependents)
    assert run.plan.dependents.static is static_deps
    assert run.defs["src"] is static_defs["src"] and len(run.defs) == 53
    assert "m[49]" in run.defs and "m[50]" not in run.defs and "m[01]" not in run.defs
    for bad in ("m[x]", "m[]", "[1]", "nope[0]", "m[-1]", "m[1", "m[\uff11]"):
        assert bad not in run.defs
        with pytest.raises(KeyError):
            run.defs[bad]


# -- refold, fold_run and checkpoints with elements ----------------------------------------------------


def random_map_workflow(rng: random.Random) -> WorkflowDef:
    """A random workflow with maps: over a run-time list, over a literal, over a map, and reducers."""
    triggers = ["all_success", "all_success", "all_done", "none_failed", "one_failed"]

    def build(wf: Workflow) -> None:
        x = wf.add("sim.mix", 1, id="x")
        src = wf.add("sim.range", rng.randint(0, 6), id="src")
        a = wf.map("sim.mix", src, args=[x] if rng.random() < 0.5 else [], id="a")
        b = wf.map("sim.mix", a, id="b", trigger=rng.choice(triggers))
        lit = wf.map("sim.mix", [rng.randint(0, 9) for _ in range(rng.randint(0, 4))], id="lit")
        wf.add("sim.mix", b, lit, id="total", trigger=rng.choice(triggers))
        if rng.random() < 0.5:
            wf.map("sim.mix", b, args=[a], id="c")  # takes all of a: waits for a's end

    return _wf(build)


def map_sim_log(seed: int) -> tuple[Sim, list[Event]]:
    rng = random.Random(seed)
    definition = random_map_workflow(rng)
    elements = [f"{m}[{i}]" for m in ("a", "b", "c", "lit") for i in range(6)]
    pick = lambda k: set(rng.sample(elements, k))  # noqa: E731
    sim = Sim(
        definition,
        rng,
        fail_first=pick(4),
        fail_always=pick(rng.randint(0, 2)),
        lose_first=pick(2),
        takeover=pick(2),
        retry_delay=0.5,
    )
    if rng.random() < 0.2:
        sim.fail_always.add("src")
    sim.run_to_end()
    return sim, sim.log


@pytest.mark.parametrize("seed", range(30))
def test_map_runs_end_and_fold_paths_agree(seed):
    from tests.unit.test_fold import _chunks, assert_same_state, one_by_one

    sim, log = map_sim_log(seed)
    assert sim.run.status.terminal and not sim.violations
    run = sim.run
    if run.tasks["src"].status is S.COMPLETED:
        assert len(run.growth.layers.get("a", ())) == len(run.tasks["src"].result)
    want = one_by_one(log)
    assert_same_state(fold(log), want)
    state = EMPTY
    for piece in _chunks(random.Random(seed), log):
        state = fold(piece, state)
    assert_same_state(state, want)
    got = fold_run(None, log)
    assert got is not None
    assert_same_state(State(runs=pmap({RUN: got})), want)
    # Replaying the whole log again changes nothing: every event, MAP_EXPANDED included, is idempotent.
    assert_same_state(fold(log, want), want)
    assert functools.reduce(apply, log, want) == want


@pytest.mark.parametrize("seed", range(12))
def test_every_prefix_of_a_map_run_round_trips_a_checkpoint(seed):
    _sim, log = map_sim_log(seed)
    run = None
    for i, e in enumerate(log):
        run = apply_to_run(run, e)
        assert run is not None
        if i % 5 == 0 or e.type is E.MAP_EXPANDED or i == len(log) - 1:
            back = checkpoint.decode(json.loads(json.dumps(checkpoint.encode(run))))
            for name in RunState._fields:
                assert getattr(back, name) == getattr(run, name), (i, name)
            rest = fold_run(back, log[i + 1 :])
            assert rest == fold_run(run, log[i + 1 :])


def test_the_sim_computes_what_the_map_means():
    def build(wf: Workflow) -> None:
        src = wf.add("sim.range", 4, id="src")
        a = wf.map("sim.mix", src, args=[2], id="a")
        b = wf.map("sim.mix", a, id="b")
        wf.add("sim.mix", b, id="total")

    sim = Sim(_wf(build), random.Random(1), fail_first={"a[2]", "b[0]"})
    sim.run_to_end()
    run = sim.run
    assert run.status is RunStatus.COMPLETED
    a = [mix([i, 2]) for i in range(4)]
    b = [mix([v]) for v in a]
    assert mapping.result_of(run, "a") == a and mapping.result_of(run, "b") == b
    assert run.tasks["total"].result == mix([b])
    assert run.tasks["a[2]"].attempt == 2
    assert sim.runs.count(("a[2]", 1)) == 1 and sim.runs.count(("a[2]", 2)) == 1


@pytest.mark.parametrize("seed", range(20))
def test_map_logs_with_duplicates_and_noise_fold_alike(seed):
    """Duplicated events and arbitrary ones (MAP_EXPANDED of any width for any task among them) still
    fold alike on every path (and never raise: a run an event cannot be applied to is rejected)."""
    from tests.unit.test_fold import _chunks, _noise, assert_same_state, one_by_one

    rng = random.Random(seed + 1000)
    _sim, log = map_sim_log(seed)
    ids = [*(t for t in _sim.run.defs), "m[0]", "a[99]"]
    log = list(log)
    for _ in range(len(log) // 2):
        i = rng.randrange(len(log))
        if rng.random() < 0.5:
            log.insert(rng.randint(i + 1, len(log)), log[i])
        elif rng.random() < 0.5:
            width = rng.choice([0, 1, 2, 3, 5, None, "3"])
            tid = rng.choice(["a", "b", "c", "lit", "total", "a[0]"])
            noise = Event(E.MAP_EXPANDED, RUN, tid, rng.choice([1, 2]), {"width": width}, ts=log[i].ts)
            log.insert(rng.randint(0, len(log)), noise)
        else:
            log.insert(rng.randint(1, len(log)), _noise(rng, RUN, ids, log[i].ts))
    want = one_by_one(log)
    assert_same_state(fold(log), want)
    state = EMPTY
    for piece in _chunks(rng, log):
        state = fold(piece, state)
    assert_same_state(state, want)


def test_elements_keep_every_option_of_their_map():
    from dataclasses import replace

    from nerv_cluster.model import CircuitBreaker, RetryPolicy

    def build(wf: Workflow) -> None:
        wf.map(
            "sim.mix",
            [7, 8],
            args=[1],
            kwargs={"k": 2},
            id="m",
            priority="critical",
            timeout=3.5,
            retry=RetryPolicy(max_retries=2),
            circuit=CircuitBreaker(failures=3),
            queue="io",
            tags=["t"],
            trigger="all_done",
            context=True,
            description="each",
        )

    run = fold_in(None, started(_wf(build)))
    run = fold_in(run, step(run).events)
    m = run.defs["m"]
    for i, value in enumerate([7, 8]):
        want = replace(m, id=f"m[{i}]", name=f"m[{i}]", args=(value, 1), over=None)
        assert run.defs[f"m[{i}]"] == want


def test_the_job_bound_counts_a_maps_pieces_and_its_result():
    """An element carries its piece of an upstream result, and a map's result (stored nowhere: the
    map node's own is None) is its elements': both are measured against the job bound."""
    limits = Limits(max_job_bytes=3000)
    run = fold_in(None, [*started(crawl()), *completes("src", ["x" * 5000, "y"])])
    run = fold_in(run, step(run, limits=limits).events)
    out = step(run, limits=limits)
    assert [e.task_id for e in out.events if e.type is E.TASK_FAILED] == ["m[0]"]
    assert [job.task_id for job, _ in out.jobs] == ["m[1]"]
    assert "PayloadTooLargeError" in str([e.data for e in out.events if e.task_id == "m[0]"])
    run = fold_in(None, [*started(crawl()), *completes("src", [1, 2])])
    run = fold_in(run, step(run, limits=limits).events)
    run = fold_in(run, [*completes("m[0]", "r" * 2000), *completes("m[1]", "s" * 2000)])
    run = fold_in(run, step(run, limits=limits).events)  # m completes
    out = step(run, limits=limits)
    [failed] = out.events
    assert (failed.type, failed.task_id, out.jobs) == (E.TASK_FAILED, "total", [])
    assert failed.data["error"]["type"] == "PayloadTooLargeError"


# -- rerun (the map's hook) -----------------------------------------------------------------------------


def _rerun(n: int = 1, tasks: list[str] | None = None) -> Event:
    data: dict[str, Any] = {"n": n}
    if tasks is not None:
        data["tasks"] = tasks
    return ev(E.WORKFLOW_RERUN_REQUESTED, **data)


def _map_sim(fail: set[str]) -> Sim:
    def build(wf: Workflow) -> None:
        src = wf.add("sim.range", 4, id="src")
        a = wf.map("sim.mix", src, args=[2], id="a")
        b = wf.map("sim.mix", a, id="b")
        wf.add("sim.mix", b, id="total")

    sim = Sim(_wf(build), random.Random(3), fail_always=fail)
    sim.run_to_end()
    return sim


def _expected(sim: Sim) -> None:
    run = sim.run
    a = [mix([i, 2]) for i in range(4)]
    b = [mix([v]) for v in a]
    assert run.status is RunStatus.COMPLETED, run.reason
    assert mapping.result_of(run, "a") == a and mapping.result_of(run, "b") == b
    assert run.tasks["total"].result == mix([b])


def _same_on_every_path(sim: Sim) -> None:
    from tests.unit.test_fold import assert_same_state, one_by_one

    want = one_by_one(sim.log)
    assert_same_state(fold(sim.log), want)
    got = fold_run(None, sim.log)
    assert got is not None and got == want.runs[RUN]
    run = want.runs[RUN]
    assert checkpoint.decode(json.loads(json.dumps(checkpoint.encode(run)))) == run


def test_a_rerun_runs_a_maps_failed_elements_only():
    sim = _map_sim({"a[1]"})
    run = sim.run
    assert run.status is RunStatus.FAILED and run.tasks["a"].status is S.FAILED
    assert run.tasks["b[1]"].status is S.SKIPPED and run.tasks["total"].status is S.SKIPPED
    since = len(sim.runs)
    sim.fail_always.clear()
    sim.emit([_rerun(1)])
    run = sim.run
    assert run.tasks["a"].status is S.RUNNING and run.tasks["a"].attempt == 2
    assert (run.tasks["a"].ok, run.tasks["a"].failed) == (3, 0) and "a" not in run.running
    assert "a" not in run.gathered and run.tasks["a[1]"].status is S.READY
    sim.run_to_end()
    _expected(sim)
    assert sorted(tid for tid, _ in sim.runs[since:]) == ["a[1]", "b[1]", "total"]
    assert not any(e.type is E.MAP_EXPANDED for e in sim.log[-30:] if e.ts > sim.log[since].ts)
    _same_on_every_path(sim)


def test_a_rerun_naming_a_map_reruns_all_its_elements():
    sim = _map_sim(set())
    _expected(sim)
    since = len(sim.runs)
    sim.emit([_rerun(1, ["b"])])
    assert sim.run.tasks["b"].status is S.RUNNING and sim.run.tasks["b"].ok == 0
    sim.run_to_end()
    _expected(sim)
    assert sorted(tid for tid, _ in sim.runs[since:]) == sorted([f"b[{i}]" for i in range(4)] + ["total"])
    _same_on_every_path(sim)


def test_a_rerun_of_what_a_map_maps_over_keeps_the_maps_list():
    """A map's list is fixed once it expanded: rerunning its source reruns the source; the map ends
    again at once over the elements it has (a source ending late is no element of it)."""
    sim = _map_sim(set())
    since = len(sim.runs)
    sim.emit([_rerun(1, ["src"])])
    run = sim.run
    assert run.tasks["a"].status is S.RUNNING and "a" in run.gathered
    sim.run_to_end()
    _expected(sim)
    assert sorted(tid for tid, _ in sim.runs[since:]) == ["src", "total"]
    _same_on_every_path(sim)


def test_a_rerun_of_one_element_reruns_it_and_what_follows_it():
    sim = _map_sim(set())
    since = len(sim.runs)
    sim.emit([_rerun(1, ["a[2]"])])
    sim.run_to_end()
    _expected(sim)
    assert sorted(tid for tid, _ in sim.runs[since:]) == ["a[2]", "b[2]", "total"]
    _same_on_every_path(sim)


@pytest.mark.parametrize("seed", range(25))
def test_random_map_runs_rerun_to_completion_running_only_what_did_not_complete(seed):
    rng = random.Random(seed + 500)
    definition = random_map_workflow(rng)
    elements = [f"{m}[{i}]" for m in ("a", "b", "c", "lit") for i in range(6)]
    sim = Sim(
        definition, rng, fail_always=set(rng.sample(elements, 3)), lose_first=set(rng.sample(elements, 2))
    )
    if rng.random() < 0.2:
        sim.fail_always.add("src")
    sim.run_to_end()
    if sim.run.status is RunStatus.COMPLETED:
        return
    done_before = {t for t, ts in sim.run.tasks.items() if ts.status is S.COMPLETED}
    since = len(sim.runs)
    sim.fail_always.clear()
    sim.lose_first.clear()  # (a first attempt in the rerun would lose its worker again)
    sim.emit([_rerun(1)])
    sim.run_to_end()
    run = sim.run
    assert run.status.terminal and not sim.violations
    again = [tid for tid, _ in sim.runs[since:]]
    assert not set(again) & done_before, "a completed task ran again"
    assert len(again) == len(set(again)), "a task ran twice in the rerun"
    # Nothing fails any more: what is left FAILED is only a map some of whose elements were SKIPPED by
    # their trigger rule (a one_failed map whose upstream elements completed: not all its elements
    # completed), and nothing is left unfinished but by trigger rules.
    for tid, ts in run.tasks.items():
        if ts.status is S.FAILED:
            layer = run.growth.layers.get(tid, ())
            assert layer and all(run.tasks[e.id].status in (S.COMPLETED, S.SKIPPED) for e in layer), tid
        assert ts.status in (S.COMPLETED, S.SKIPPED, S.FAILED), tid
    _same_on_every_path(sim)
