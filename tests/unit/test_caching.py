"""Result caching (issue 16, part "cache") without Redis: keys, the Cache option, entries, the in-flight
map, ``decide`` with a cache view, the fold of cached events, checkpoints, and the scheduler's cache room
over an in-memory store."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from pyrsistent import pmap

from nerv_cluster import caching, checkpoint
from nerv_cluster.caching import CacheView, Entry, Flights, Kind
from nerv_cluster.constants import Keys
from nerv_cluster.errors import CacheKeyError, WorkflowError
from nerv_cluster.model import Cache, EventType, RunStatus, TaskDef, TaskError, TaskStatus
from nerv_cluster.registry import Registry, task
from nerv_cluster.state import RunState, State, apply_to_run, fold, fold_run, run_result
from nerv_cluster.workflow import Workflow
from scheduler.caching import CacheRoom
from scheduler.decisions import Decisions, decide
from tests.unit.helpers import RUN, ev, run_of, submitted, td, wdef

E = EventType
REG = Registry()
SOURCE = "scheduler:7"
C = Cache(ttl=60)


@task(name="c.square", registry=REG, cache=Cache(ttl=30, version="2"))
def square(x: int) -> int:
    return x * x


@task(name="c.key", registry=REG)
def by_first(args: list[Any], kwargs: dict[str, Any]) -> str:
    return str(args[0])


@task(name="c.badkey", registry=REG)
def bad_key(args: list[Any], kwargs: dict[str, Any]) -> int:
    return 3


# -- keys ---------------------------------------------------------------------------------------------------


def test_the_default_key_is_canonical_and_covers_name_version_arguments_and_context() -> None:
    base = caching.default_key("f", C, [1, {"a": 1, "b": 2}], {"x": 1, "y": [1]})
    assert base == caching.default_key("f", C, [1, {"b": 2, "a": 1}], {"y": [1], "x": 1})
    assert len(base) == 64 and int(base, 16) >= 0
    others = {
        caching.default_key("g", C, [1, {"a": 1, "b": 2}], {"x": 1, "y": [1]}),
        caching.default_key("f", Cache(ttl=60, version="2"), [1, {"a": 1, "b": 2}], {"x": 1, "y": [1]}),
        caching.default_key("f", C, [2, {"a": 1, "b": 2}], {"x": 1, "y": [1]}),
        caching.default_key("f", C, [1, {"a": 1, "b": 2}], {"x": 2, "y": [1]}),
        caching.default_key("f", C, [1, {"a": 1, "b": 2}], {"x": 1, "y": [1]}, {"up": 1}),
    }
    assert base not in others and len(others) == 5
    assert Cache(ttl=5) != C and caching.default_key("f", Cache(ttl=5), [], {}) == caching.default_key(
        "f", C, [], {}
    )  # the ttl is how long an entry lives, not part of what it is


def test_a_custom_key_is_namespaced_and_must_be_a_string() -> None:
    keyed = Cache(ttl=1, key="c.key")
    assert caching.custom_key("f", keyed, "x") == caching.custom_key("f", keyed, "x")
    assert caching.custom_key("f", keyed, "x") != caching.custom_key("g", keyed, "x")
    assert caching.custom_key("f", keyed, "x") != caching.default_key("f", keyed, ["x"], {})
    with pytest.raises(CacheKeyError, match="must return a string"):
        caching.custom_key("f", keyed, 3)
    with pytest.raises(ValueError):
        caching.canonical([math.nan])


# -- the option ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ttl", [0, -1, math.inf, math.nan, True, "60", None])
def test_a_bad_ttl_is_refused(ttl: Any) -> None:
    with pytest.raises(WorkflowError, match="ttl"):
        Cache(ttl=ttl)


def test_the_key_is_a_registered_function_or_its_name() -> None:
    assert Cache(ttl=1, key=by_first).key == "c.key" == Cache(ttl=1, key="c.key").key_name
    with pytest.raises(WorkflowError, match="decorate it with @task"):
        Cache(ttl=1, key=lambda a, k: "x")
    with pytest.raises(WorkflowError, match="version"):
        Cache(ttl=1, version=2)  # type: ignore[arg-type]


def test_cache_travels_in_the_definition_and_defaults_from_the_task() -> None:
    wf = Workflow("c", registry=REG)
    a = wf.add(square, 3)
    b = wf.add(square, 4, cache=Cache(ttl=5, key=by_first))
    c = wf.add("c.key", [1], {})
    defs = {t.id: t for t in wf.tasks}
    assert defs[a.id].cache == Cache(ttl=30, version="2")
    assert defs[b.id].cache == Cache(ttl=5, key="c.key")
    assert defs[c.id].cache is None
    for t in wf.tasks:
        assert TaskDef.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    with pytest.raises(WorkflowError, match="cache="):
        wf.add(square, 1, cache={"ttl": 1})  # type: ignore[arg-type]
    with pytest.raises(WorkflowError):
        Cache.from_dict({"version": "1"})


def test_entries_round_trip_and_unreadable_ones_are_misses() -> None:
    entry = Entry({"v": [1, None]}, "run-a", "t", 2, 1234.5)
    assert Entry.parse(entry.to_json()) == entry and entry.source == "run-a/t"
    assert Entry.parse(Entry(None, "r", "t", 1, 1.0).to_json()) == Entry(None, "r", "t", 1, 1.0)
    for raw in (None, "", "nope", "[]", '{"r": 1}', '{"r": 1, "run": "r", "task": "t", "a": "x", "at": 1}'):
        assert Entry.parse(raw) is None


def test_cache_entry_keys_and_patterns() -> None:
    keys = Keys("p")
    assert keys.cache_entry("m.f", "ab") == "p:cache:m.f:ab"
    assert keys.cache_pattern() == "p:cache:*"
    assert keys.cache_pattern("m.f") == "p:cache:m.f:*"
    assert Keys("a*b").cache_pattern("x?[y]") == "a\\*b:cache:x\\?\\[y\\]:*"


# -- the in-flight map ---------------------------------------------------------------------------------


def test_flights_claim_hold_release() -> None:
    f = Flights()
    assert not f.busy("k", "r1", "a")
    f.claim("k", "r1", "a")
    f.claim("k", "r1", "a")  # idempotent
    assert len(f) == 1 and f.key_of("r1", "a") == "k"
    assert not f.busy("k", "r1", "a") and f.busy("k", "r2", "a")  # never busy for its own owner
    f.hold("k", "r2", "a")
    f.hold("k", "r3", "b")
    assert f.release("r9", "x") == (None, set())
    assert f.release("r1", "a") == ("k", {"r2", "r3"})
    assert not f.busy("k", "r2", "a") and len(f) == 0
    f.claim("k", "r1", "a")
    f.claim("j", "r1", "b")
    f.hold("j", "r4", "c")
    assert f.release_run("r1") == {"r4"} and len(f) == 0


# -- decide with a cache view --------------------------------------------------------------------------------


def _expanded(events: list[Any]) -> list[Any]:
    """Events as readers see them: a CACHE_HITS as its completions."""
    return [one for e in events for one in caching.expand(e)]


def _cached_run(*tasks: TaskDef, meta: dict[str, Any] | None = None) -> RunState:
    definition = wdef(*tasks)
    if meta:
        definition = definition.__class__(definition.name, definition.tasks, meta)
    return run_of(fold([submitted(definition)]))


def _view(
    run: RunState, keys: dict[str, str | TaskError], entries: dict[str, Entry], flights: Flights
) -> CacheView:
    refresh = frozenset({run.run_id}) if caching.is_refresh(run.definition.meta) else frozenset()
    return CacheView({(run.run_id, t): k for t, k in keys.items()}, entries, refresh, flights, set())


def test_decide_hits_holds_misses_and_fails() -> None:
    run = _cached_run(
        td("hit", cache=C), td("miss", cache=C), td("twin", cache=C), td("busy", cache=C), td("bad", cache=C)
    )
    flights = Flights()
    flights.claim("kb", "other-run", "t")
    error = TaskError.from_exception(CacheKeyError("no key"))
    view = _view(
        run,
        {"hit": "kh", "miss": "km", "twin": "km", "busy": "kb", "bad": error},
        {"kh": Entry(42, "old-run", "x", 1, 1.0)},
        flights,
    )
    out = Decisions()
    decide(run, 10.0, SOURCE, out, cache=view)
    assert [e.type for e in out.events if e.task_id is None] == [E.WORKFLOW_STARTED, E.CACHE_HITS]
    by_task = {e.task_id: e for e in _expanded(out.events) if e.task_id}
    hit = by_task["hit"]
    assert hit.type is E.TASK_COMPLETED and hit.data["result"] == 42 and hit.data["cached"] is True
    assert hit.data["cached_from"] == "old-run/x"
    assert by_task["miss"].type is E.TASK_DISPATCHED and by_task["miss"].data["cache_key"] == "km"
    assert "twin" not in by_task and "busy" not in by_task  # held: one key computed once
    assert by_task["bad"].type is E.TASK_FAILED and by_task["bad"].data["error"]["type"] == "CacheKeyError"
    assert [job.task_id for job, _ in out.jobs] == ["miss"]
    assert flights.key_of(RUN, "miss") == "km" and flights.busy("km", RUN, "twin")

    state = fold(out.events, fold([submitted(run.definition)]))
    after = run_of(state)
    assert after.tasks["miss"].cache_key == "km"
    assert after.tasks["hit"].cached_from == "old-run/x" and after.cached == 1
    res = run_result(after)
    assert (
        res.tasks["hit"].cached
        and res.tasks["hit"].cached_from == "old-run/x"
        and res.tasks["hit"].attempts == 0
    )
    assert not res.tasks["miss"].cached
    assert after.tasks["twin"].status is TaskStatus.READY and not after.tasks["twin"].dispatched
    # The twin's turn comes when the miss completes: the next step finds the entry.
    done = ev(E.TASK_COMPLETED, "miss", 1, result=5, worker="w")
    after = apply_to_run(after, ev(E.TASK_STARTED, "miss", 1, worker="w"))
    after = apply_to_run(after, done)
    assert after is not None
    flights.release(RUN, "miss")
    out = Decisions()
    decide(
        after,
        11.0,
        SOURCE,
        out,
        cache=_view(after, {"twin": "km", "busy": "kb"}, {"km": Entry(5, RUN, "miss", 1, 2.0)}, flights),
    )
    twin = [e for e in _expanded(out.events) if e.task_id == "twin"]
    assert [e.type for e in twin] == [E.TASK_COMPLETED] and twin[0].data["result"] == 5


def test_a_refreshing_run_computes_even_with_an_entry_or_a_key_in_flight() -> None:
    run = _cached_run(td("t", cache=C), meta={caching.REFRESH_META: True})
    flights = Flights()
    flights.claim("k", "other", "t")
    out = Decisions()
    decide(run, 1.0, SOURCE, out, cache=_view(run, {"t": "k"}, {"k": Entry(1, "o", "t", 1, 0.0)}, flights))
    assert [(e.type, e.data.get("cache_key")) for e in out.events if e.task_id] == [(E.TASK_DISPATCHED, "k")]


def test_without_a_view_cacheable_tasks_dispatch_as_before() -> None:
    run = _cached_run(td("t", cache=C))
    out = Decisions()
    decide(run, 1.0, SOURCE, out)
    assert [e.type for e in out.events if e.task_id] == [E.TASK_DISPATCHED]
    assert "cache_key" not in out.events[-1].data


def test_cached_state_round_trips_through_a_checkpoint() -> None:
    run = _cached_run(td("a", cache=C), td("b", "a", cache=C))
    log = [
        submitted(run.definition),
        ev(E.TASK_COMPLETED, "a", 1, result=3, cached=True, cached_from="r0/a", cache_key="ka"),
        ev(E.TASK_DISPATCHED, "b", 1, queue="cpu", cache_key="kb"),
    ]
    folded = fold_run(None, log)
    assert folded is not None and folded.cached == 1 and folded.tasks["b"].cache_key == "kb"
    again = checkpoint.decode(json.loads(json.dumps(checkpoint.encode(folded))))
    assert again == folded


# -- the scheduler's room over an in-memory store ------------------------------------------------------------


class MemoryStore:
    """CacheStore's interface over a dict (no TTL)."""

    def __init__(self) -> None:
        self.keys = Keys("t")
        self.data: dict[str, str] = {}
        self.calls: list[tuple[int, int]] = []

    def exchange(
        self, token: str, stores: list[tuple[str, str, int, bool]], lookups: list[str]
    ) -> list[str | None]:
        self.calls.append((len(stores), len(lookups)))
        for key, value, _ttl, nx in stores:
            if not (nx and key in self.data):
                self.data[key] = value
        return [self.data.get(k) for k in lookups]


def _room(store: MemoryStore) -> CacheRoom:
    return CacheRoom(store, lambda: "tok", lambda: 100.0, REG)  # type: ignore[arg-type]


def _two_runs() -> tuple[Any, list[Any]]:
    wf = Workflow("pair", registry=REG)
    wf.add(square, 3, id="s")
    definition = wf.definition()
    subs = [submitted(definition, run_id=rid) for rid in ("ra", "rb")]
    return fold(subs), subs


def test_the_room_computes_once_across_runs_and_stores_the_result() -> None:
    store = MemoryStore()
    room = _room(store)
    state, _ = _two_runs()
    view = room.prepare(["ra", "rb"], state)
    assert view is not None and store.calls == [(0, 1)]  # one round trip, one key read once
    out = Decisions()
    for rid in ("ra", "rb"):
        decide(state.runs[rid], 1.0, SOURCE, out, cache=view)
    assert [(e.run_id, e.type) for e in out.events if e.task_id] == [("ra", E.TASK_DISPATCHED)]
    state = fold(out.events, state)
    assert room.observe(out.events, state) == set()
    worker = [
        ev(E.TASK_STARTED, "s", 1, run_id="ra", worker="w"),
        ev(E.TASK_COMPLETED, "s", 1, run_id="ra", result=9),
    ]
    state = fold(worker, state)
    assert room.observe(worker, state) == {"rb"}  # the held run is decided again
    view = room.prepare(["rb"], state)
    assert view is not None and store.calls[-1] == (1, 1)  # the store first, then the read
    out = Decisions()
    decide(state.runs["rb"], 2.0, SOURCE, out, cache=view)
    hit = [e for e in _expanded(out.events) if e.task_id]
    assert [(e.type, e.data["result"], e.data["cached_from"]) for e in hit] == [(E.TASK_COMPLETED, 9, "ra/s")]
    key = state.runs["ra"].tasks["s"].cache_key
    assert key is not None and json.loads(store.data[store.keys.cache_entry("c.square", key)])["r"] == 9


def test_a_new_room_rebuilds_the_flights_and_stores_computed_results_again() -> None:
    store = MemoryStore()
    room = _room(store)
    state, _ = _two_runs()
    view = room.prepare(["ra", "rb"], state)
    out = Decisions()
    for rid in ("ra", "rb"):
        decide(state.runs[rid], 1.0, SOURCE, out, cache=view)
    state = fold(out.events, state)
    fresh = _room(store)  # a new leader: only the folded state
    fresh.rebuild(state)
    key = state.runs["ra"].tasks["s"].cache_key
    assert key is not None and fresh.flights.busy(key, "rb", "s") and not fresh.flights.busy(key, "ra", "s")
    done = [
        ev(E.TASK_STARTED, "s", 1, run_id="ra", worker="w"),
        ev(E.TASK_COMPLETED, "s", 1, run_id="ra", result=9, ts=99.0),
    ]
    state = fold(done, state)
    newest = _room(store)
    newest.rebuild(state)  # the leader died before storing: stored again, where absent
    newest.flush()
    assert (
        store.calls[-1] == (1, 0)
        and json.loads(store.data[store.keys.cache_entry("c.square", key)])["r"] == 9
    )


def test_a_key_function_runs_in_the_room_and_its_failures_fail_the_task() -> None:
    wf = Workflow("keyed", registry=REG)
    wf.add(square, 3, id="good", cache=Cache(ttl=1, key=by_first))
    wf.add(square, 3, id="bad", cache=Cache(ttl=1, key=bad_key))
    wf.add(square, 3, id="missing", cache=Cache(ttl=1, key="nowhere.key"))
    state = fold([submitted(wf.definition())])
    room = _room(MemoryStore())
    run = state.runs[RUN]
    assert room.key_of(run, "good") == caching.custom_key("c.square", Cache(ttl=1, key="c.key"), "3")
    bad, missing = room.key_of(run, "bad"), room.key_of(run, "missing")
    assert isinstance(bad, TaskError) and "must return a string" in bad.message
    assert isinstance(missing, TaskError) and "not registered in the scheduler" in missing.message
    assert "--app" in missing.message
    view = room.prepare([RUN], state)
    assert view is not None
    assert view.verdict(RUN, "bad").kind is Kind.FAIL and view.verdict(RUN, "good").kind is Kind.MISS


def test_progress_and_status_mark_cached_results() -> None:
    from rich.console import Console

    from nerv_cluster import progress

    run = _cached_run(td("a", cache=C), td("b", cache=C))
    log = [
        submitted(run.definition),
        ev(E.TASK_COMPLETED, "a", 1, result=3, cached=True, cached_from="r0/a"),
        *[ev(E.TASK_DISPATCHED, "b", 1), ev(E.TASK_STARTED, "b", 1, worker="w")],
        ev(E.TASK_COMPLETED, "b", 1, result=4, worker="w"),
    ]
    folded = fold_run(None, log)
    assert folded is not None and folded.cached == 1
    assert progress.counts_text(folded.counts, cached=folded.cached).plain == "COMPLETED 2 (cached 1)"
    result = run_result(folded)
    data = progress.result_dict(result)
    assert (
        data["cached"] == 1
        and data["tasks"]["a"]["cached_from"] == "r0/a"
        and not data["tasks"]["b"]["cached"]
    )
    console = Console(record=True, width=100)
    console.print(progress.status_renderable(result))
    assert "from the cache" in console.export_text()


def test_the_scheduler_counts_hits_and_misses() -> None:
    from scheduler.metrics import SchedulerMetrics

    metrics = SchedulerMetrics()
    metrics.on_decided(
        [
            ev(E.CACHE_HITS, hits=[["a", 1, 1, "r/a"], ["d", 1, 2, "r/d"]]),
            ev(E.TASK_DISPATCHED, "b", 1, queue="cpu", cache_key="k"),
            ev(E.TASK_DISPATCHED, "c", 1, queue="cpu"),
        ]
    )
    value = metrics.registry.get_sample_value
    assert value("nerv_cache_lookups_total", {"result": "hit"}) == 2
    assert value("nerv_cache_lookups_total", {"result": "miss"}) == 1


def test_the_scheduler_imports_its_modules_and_names_one_it_cannot() -> None:
    from nerv_cluster.errors import ConfigurationError
    from nerv_cluster.settings import Settings
    from scheduler.caching import import_modules

    assert Settings.from_env({"NERV_SCHEDULER_MODULES": "a.b, c"}).scheduler_modules == ("a.b", "c")
    assert Settings.from_env({}).scheduler_modules == ()
    import_modules(["json"])
    with pytest.raises(ConfigurationError, match="no_such_module_here"):
        import_modules(["no_such_module_here"])


def test_an_owner_cancelled_or_forgotten_wakes_the_runs_waiting_for_its_key() -> None:
    store = MemoryStore()
    room = _room(store)
    state, _ = _two_runs()
    view = room.prepare(["ra", "rb"], state)
    out = Decisions()
    for rid in ("ra", "rb"):
        decide(state.runs[rid], 1.0, SOURCE, out, cache=view)
    state = fold(out.events, state)
    room.observe(out.events, state)
    cancel = [ev(E.WORKFLOW_CANCEL_REQUESTED, run_id="ra", reason="stop")]
    state = fold(cancel, state)
    out = Decisions()
    decide(state.runs["ra"], 2.0, SOURCE, out)
    state = fold(out.events, state)
    assert room.observe(out.events, state) == {"rb"}  # the cancelled owner released its key
    assert not store.data  # nothing computed, nothing stored
    view = room.prepare(["rb"], state)
    assert view is not None and view.verdict("rb", "s").kind is Kind.MISS  # the waiter computes now
    # A run forgotten while it owns a key wakes the runs waiting for it too.
    room = _room(store)
    state, _ = _two_runs()
    view = room.prepare(["ra", "rb"], state)
    out = Decisions()
    for rid in ("ra", "rb"):
        decide(state.runs[rid], 1.0, SOURCE, out, cache=view)
    assert room.forget(["ra"]) == {"rb"}


def test_hits_of_a_step_are_one_event_and_expand_to_unique_completions() -> None:
    run = _cached_run(*[td(f"t{i}", cache=C) for i in range(50)])
    entries = {f"k{i}": Entry(i, "r0", f"t{i}", 1, 0.0) for i in range(50)}
    ids: set[str] = set()
    for _ in range(3):
        out = Decisions()
        view = _view(run, {f"t{i}": f"k{i}" for i in range(50)}, entries, Flights())
        decide(run, 1.0, SOURCE, out, cache=view)
        # Every task a hit: the run ends in the same write.
        assert [e.type for e in out.events] == [E.WORKFLOW_STARTED, E.CACHE_HITS, E.WORKFLOW_COMPLETED]
        hits = [e for e in _expanded(out.events) if e.type is E.TASK_COMPLETED]
        assert [e.data["result"] for e in hits] == list(range(50))
        ids.update(e.id for e in hits)
    assert len(ids) == 150


def test_a_run_ends_with_its_hits_only_when_nothing_else_is_left() -> None:
    tasks = [td("a", cache=C), td("b", cache=C), td("c", "a", cache=C), td("f")]
    run = _cached_run(*tasks)
    entries = {"ka": Entry(1, "r0", "a", 1, 0.0), "kb": Entry(2, "r0", "b", 1, 0.0)}

    def step(run: RunState, now: float) -> tuple[RunState, list[EventType]]:
        out = Decisions()
        ready = {t: f"k{t}" for t in run.ready if run.defs[t].cache is not None}
        decide(run, now, SOURCE, out, cache=_view(run, ready, entries, Flights()))
        return run_of(fold(out.events, State(runs=pmap({RUN: run})))), [e.type for e in out.events]

    # a and b hit, but f is dispatched and c waits for a: no end yet.
    after, kinds = step(run, 1.0)
    assert kinds == [E.WORKFLOW_STARTED, E.TASK_DISPATCHED, E.CACHE_HITS]
    after = fold(
        [ev(E.TASK_STARTED, "f", 1, worker="w"), ev(E.TASK_FAILED, "f", 1, error=None)],
        State(runs=pmap({RUN: after})),
    ).runs[RUN]
    # c hits next, but f FAILED: the usual end decides (here: the run fails, in the next step).
    entries["kc"] = Entry(3, "r0", "c", 1, 0.0)
    after, kinds = step(after, 2.0)
    assert kinds == [E.CACHE_HITS] and after.status is RunStatus.RUNNING
    after, kinds = step(after, 3.0)
    assert kinds == [E.WORKFLOW_FAILED]
    # Without the failure, the last hits end the run at once, COMPLETED.
    run = _cached_run(td("a", cache=C), td("c", "a", cache=C))
    entries["kc"] = Entry(3, "r0", "c", 1, 0.0)
    after, kinds = step(run, 1.0)
    assert kinds == [E.WORKFLOW_STARTED, E.CACHE_HITS] and after.status is RunStatus.RUNNING
    after, kinds = step(after, 2.0)
    assert kinds == [E.CACHE_HITS, E.WORKFLOW_COMPLETED] and after.status is RunStatus.COMPLETED
    assert run_result(after).results == {"a": 1, "c": 3}


def test_hit_events_are_bounded_by_count_and_by_bytes() -> None:
    hits = [(f"t{i}", 1, Entry("x" * 90, "r0", f"t{i}", 1, 0.0, size=100)) for i in range(10)]
    by_count = caching.hit_events(RUN, hits, 1.0, SOURCE, per_event=4, max_bytes=10**6)
    assert [len(e.data["hits"]) for e in by_count] == [4, 4, 2]
    by_bytes = caching.hit_events(RUN, hits, 1.0, SOURCE, per_event=100, max_bytes=350)
    assert [len(e.data["hits"]) for e in by_bytes] == [3, 3, 3, 1]
    big = [(f"t{i}", 1, Entry("y", "r0", "t", 1, 0.0, size=1000)) for i in range(2)]  # each over the bound
    assert [len(e.data["hits"]) for e in caching.hit_events(RUN, big, 1.0, SOURCE, max_bytes=10)] == [1, 1]
    assert [t.task_id for e in by_bytes for t in caching.expand(e)] == [f"t{i}" for i in range(10)]
    assert Entry.parse(Entry(1, "r", "t", 1, 0.0).to_json()) is not None
    raw = Entry([1, 2], "r", "t", 1, 0.0).to_json()
    assert Entry.parse(raw).size == len(raw)  # type: ignore[union-attr]


def test_the_fold_of_cache_hits_equals_the_fold_of_their_completions() -> None:
    tasks = [td(f"t{i}", cache=C) for i in range(40)] + [td("sink", *[f"t{i}" for i in range(40)])]
    run = _cached_run(*tasks)
    entries = {f"k{i}": Entry({"i": i}, "r0", f"t{i}", 1, 0.0) for i in range(40)}
    out = Decisions()
    decide(run, 1.0, SOURCE, out, cache=_view(run, {f"t{i}": f"k{i}" for i in range(40)}, entries, Flights()))
    base = fold([submitted(run.definition)])
    batched = run_of(fold(out.events, base))  # the bulk path (fold_run)
    one_by_one = base.runs[RUN]
    for e in out.events:  # the persistent-map path, event by event
        one_by_one = apply_to_run(one_by_one, e)  # type: ignore[assignment]
    completions = run_of(fold(_expanded(out.events), base))
    for folded in (one_by_one, completions):
        assert folded.tasks == batched.tasks and folded.cached == batched.cached == 40
        assert folded.tally == batched.tally and set(folded.ready) == set(batched.ready) == {"sink"}
    # Hits of tasks a worker was sent, or that run, or that are held, go the general way: the same.
    odd = [
        ev(E.TASK_DISPATCHED, "t1", 1, queue="cpu"),
        ev(E.TASK_DISPATCHED, "t2", 1, queue="cpu"),
        ev(E.TASK_STARTED, "t2", 1, worker="w"),
        ev(E.TASK_HELD, "t3", 1, reason="key k"),
    ]
    mixed = fold(odd, base)
    assert run_of(fold(out.events, mixed)).tasks == run_of(fold(_expanded(out.events), mixed)).tasks
    one = mixed.runs[RUN]
    for e in out.events:
        one = apply_to_run(one, e)  # type: ignore[assignment]
    assert one.tasks == run_of(fold(_expanded(out.events), mixed)).tasks and one.cached == 40
    # Idempotent, and a hit of an older attempt changes nothing.
    assert fold(out.events, fold(out.events, base)).runs[RUN].tasks == batched.tasks
    stale = ev(E.CACHE_HITS, hits=[["sink", 0, 1, "r/x"], ["t0", 5, 1, "r/x"]])
    assert apply_to_run(batched, stale) is batched


@pytest.mark.parametrize(
    "hits", [None, 3, "x", [["t", 1, 2]], [[1, 1, 2, "s"]], [["t", "1", 2, "s"]], [["t", True, 2, "s"]]]
)
def test_a_malformed_cache_hits_event_rejects_its_run_and_expands_to_nothing(hits: Any) -> None:
    run = _cached_run(td("t", cache=C))
    bad = ev(E.CACHE_HITS, hits=hits)
    after = run_of(fold([bad], fold([submitted(run.definition)])))
    assert "could not be applied" in after.rejected
    assert caching.expand(bad) == []


@pytest.mark.parametrize("bad", [{"version": "1"}, {"ttl": 0}, {"ttl": "60"}, {"ttl": 1, "version": 2}, [1]])
def test_a_submission_with_a_malformed_cache_is_a_rejected_run(bad: Any) -> None:
    raw = wdef(td("t")).to_dict()
    raw["tasks"][0]["cache"] = bad
    run = apply_to_run(None, ev(E.WORKFLOW_SUBMITTED, workflow=raw))
    assert run is not None and "invalid submission" in run.rejected and "cache" in run.rejected
    out = Decisions()
    decide(run, 1.0, SOURCE, out)
    assert [e.type for e in out.events] == [E.WORKFLOW_FAILED]
