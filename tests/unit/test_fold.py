"""The bulk fold (``fold_run``, and ``fold`` choosing it per run) against the one-by-one ``apply``.

The bulk path runs the same handlers over mutable drafts of a run's maps; these tests hold it to exactly
the result of applying the events one by one, with every map a PMap again and the input untouched.
"""

from __future__ import annotations

import functools
import random
from typing import Any

import pytest
from pyrsistent import PMap, pmap

from nerv_cluster import state as state_module
from nerv_cluster.model import Event, EventType, WorkflowDef
from nerv_cluster.state import (
    EMPTY,
    RunState,
    State,
    _bulk_pays,
    _Draft,
    apply,
    apply_to_run,
    fold,
    fold_run,
    run_result,
)
from nerv_cluster.workflow import Workflow
from tests.unit.helpers import RUN, Sim, completes, diamond, ev, random_dag, submitted, td, wdef

E = EventType
MAP_FIELDS = ("tasks", "ready", "doomed", "running", "queued")


def one_by_one(events: list[Event], state: State = EMPTY) -> State:
    return functools.reduce(apply, events, state)


def assert_same_state(got: State, want: State) -> None:
    """Equal run by run and field by field, and every map a real PMap (no draft escaped)."""
    assert type(got.runs) is PMap
    assert set(got.runs) == set(want.runs)
    for run_id, want_run in want.runs.items():
        got_run = got.runs[run_id]
        assert type(got_run) is RunState
        for name in RunState._fields:
            assert getattr(got_run, name) == getattr(want_run, name), (run_id, name)
        for name in MAP_FIELDS:
            assert type(getattr(got_run, name)) is PMap, (run_id, name)
        assert run_result(got_run) == run_result(want_run)
    assert got == want


# -- random logs: several simulated runs interleaved, plus noise ------------------------------------------


def _sim_log(rng: random.Random, run_id: str) -> tuple[WorkflowDef, list[Event]]:
    """The log of a simulated run with failures, retries, lost workers and takeovers."""
    definition = random_dag(rng.randint(1, 16), rng, max_deps=3, window=6, triggers=True)
    ids = [t.id for t in definition.tasks]
    pick = lambda k: set(rng.sample(ids, min(k, len(ids))))  # noqa: E731
    sim = Sim(
        definition,
        rng,
        fail_first=pick(3),
        fail_always=pick(rng.randint(0, 2)),
        lose_first=pick(2),
        takeover=pick(2),
        retry_delay=0.5,
        run_id=run_id,
    )
    sim.run_to_end()
    if rng.random() < 0.5:  # rerun (issue 16): the run goes on, partly fixed, once or twice
        for n in range(1, rng.randint(1, 2) + 1):
            sim.fail_always = set(rng.sample(sorted(sim.fail_always), len(sim.fail_always) // 2))
            named = None if rng.random() < 0.5 else sorted(pick(2))
            data: dict[str, Any] = {"n": n} if named is None else {"n": n, "tasks": named}
            sim.emit([Event(E.WORKFLOW_RERUN_REQUESTED, run_id, data=data, ts=sim.now)])
            sim.run_to_end()
    return definition, sim.log


def _noise(rng: random.Random, run_id: str, ids: list[str], now: float) -> Event:
    """An arbitrary event for ``run_id``: any type, any (or no, or an unknown) task, any attempt."""
    kind = rng.choice([t for t in EventType if t is not E.WORKFLOW_SUBMITTED])
    task = rng.choice([*ids, "ghost", None]) if ids else None
    data: dict[str, Any] = {}
    if rng.random() < 0.5:
        data["worker"] = rng.choice(["w1", "w2", "w9"])
    if rng.random() < 0.3:
        data["next_attempt"] = rng.randint(1, 4)
    if rng.random() < 0.3:
        data["error"] = {"type": "ValueError", "message": "noise"}
    if rng.random() < 0.3:
        data["reason"] = "noise"
    if rng.random() < 0.2:
        data["due_at"] = now + 1
    if rng.random() < 0.3:
        data["result"] = rng.randint(0, 9)
    if rng.random() < 0.2:
        data["via"] = "job-" + rng.choice(ids or ["x"])
    if rng.random() < 0.3:  # a rerun's number, and its task ids (some unknown)
        data["n"] = rng.randint(0, 3)
        if rng.random() < 0.5:
            data["tasks"] = rng.sample([*ids, "ghost"], min(2, len(ids) + 1))
    if rng.random() < 0.2:  # part "cache": a dispatch's cache key, a completion from the cache
        data["cache_key"] = rng.choice(["k1", "k2"])
    if rng.random() < 0.2:
        data.update(cached=True, cached_from="other-run/t0")
    if rng.random() < 0.3:  # part "waits": a signal's name and payload
        data.update(name=rng.choice(["go", "stop", "t0"]), payload=rng.choice([None, 1, {"by": "ana"}]))
    if rng.random() < 0.2:  # limits (issue 11): a dispatch's concurrency slot (TASK_HELD comes as any type)
        data["slot"] = rng.choice(["api", "tenant:a"])
    if rng.random() < 0.2:  # idem (issue 11): schedule events' fields (they never change a run)
        data.update(name="nightly", slot=now, upto=now, run=run_id, at=now)
    return Event(kind, run_id, task, rng.choice([None, 1, 1, 2, 3]), data, ts=now + rng.random())


def _random_log(seed: int) -> list[Event]:
    """Up to three runs interleaved (each in its own order), with duplicates, stale and random events,
    cancels, a second submit, and events of runs never submitted or submitted later."""
    rng = random.Random(seed)
    streams: list[list[Event]] = []
    for k in range(rng.randint(1, 3)):
        definition, log = _sim_log(rng, f"run-{k}")
        ids = [t.id for t in definition.tasks]
        log = list(log)
        for _ in range(rng.randint(0, len(log))):
            i = rng.randrange(len(log))
            if rng.random() < 0.5:  # a duplicate somewhere after its original
                log.insert(rng.randint(i + 1, len(log)), log[i])
            else:  # anything at all
                log.insert(rng.randint(0, len(log)), _noise(rng, f"run-{k}", ids, log[i].ts))
        if rng.random() < 0.3:
            at = rng.randint(1, len(log))
            log.insert(at, ev(E.WORKFLOW_CANCEL_REQUESTED, run_id=f"run-{k}", reason="stop"))
        if rng.random() < 0.3:
            log.insert(rng.randint(1, len(log)), submitted(wdef(td("other")), run_id=f"run-{k}"))
        streams.append(log)
    if rng.random() < 0.6:
        streams.append(_wait_log(rng, "run-waits"))
    streams.append([_noise(rng, "never-submitted", ["t0"], 1.0) for _ in range(rng.randint(0, 5))])
    return _interleave(rng, streams)


_WAIT_KINDS = [
    *(E.TASK_WAITING, E.TASK_WAITING, E.SIGNAL_RECEIVED, E.TASK_COMPLETED, E.TASK_FAILED, E.TASK_CANCELLED),
    *(E.TASK_DISPATCHED, E.TASK_STARTED, E.WORKFLOW_COMPLETED, E.WORKFLOW_RERUN_REQUESTED),
]


def _wait_log(rng: random.Random, run_id: str) -> list[Event]:
    """Part "waits": a run with signal waits and timers, in random order with duplicates: waits reached
    (or not), signals before and after, ends by signal, by deadline, by cancel, stale attempts, reruns."""
    wf = Workflow("waits")
    first = wf.add("tests.first", id="first")
    wf.wait_for("go", timeout=rng.choice([None, 2.0]), dependencies=[first])
    wf.wait_for("stop")
    wf.sleep(1.0, id="nap")
    wf.sleep_until(5.0, id="alarm", dependencies=["go"])
    wf.add(
        "tests.after",
        dependencies=["go", "nap"],
        trigger=rng.choice(["all_success", "one_failed"]),
        id="after",
    )
    ids = [t.id for t in wf.definition().tasks]
    log = [submitted(wf.definition(), run_id=run_id)]
    for _ in range(rng.randint(5, 30)):
        tid = rng.choice(ids)
        kind = rng.choice(_WAIT_KINDS)
        data: dict[str, Any] = {"result": rng.randint(0, 3)}
        if kind is E.SIGNAL_RECEIVED:
            data = {"name": rng.choice(["go", "stop", "nope"]), "payload": rng.randint(0, 3)}
        elif kind is E.WORKFLOW_RERUN_REQUESTED:
            data = {"n": rng.randint(1, 2)}
        elif kind is E.TASK_FAILED:
            data = {"error": {"type": "TaskTimeoutError", "message": "no signal"}, "reason": "timeout"}
        task = None if kind in (E.SIGNAL_RECEIVED, E.WORKFLOW_COMPLETED, E.WORKFLOW_RERUN_REQUESTED) else tid
        at = float(len(log))
        event = Event(kind, run_id, task, rng.choice([1, 1, 2]) if task else None, data, ts=at)
        if rng.random() < 0.5:  # read from the log: deadlines count from the logged time
            event = Event(kind, run_id, task, event.attempt, data, ts=at, id=event.id, logged_at=at + 0.5)
        log.append(event)
        if rng.random() < 0.2:
            log.append(log[rng.randrange(1, len(log))])
    return log


def _interleave(rng: random.Random, streams: list[list[Event]]) -> list[Event]:
    """Merge the streams in random chunks, keeping each stream's order."""
    streams = [list(s) for s in streams if s]
    out: list[Event] = []
    while streams:
        s = rng.choice(streams)
        k = rng.randint(1, 8)
        out.extend(s[:k])
        del s[:k]
        streams = [s for s in streams if s]
    return out


def _chunks(rng: random.Random, log: list[Event]) -> list[list[Event]]:
    """``log`` cut at random places: small pieces (the one-by-one path) and big ones (the bulk path)."""
    out: list[list[Event]] = []
    i = 0
    while i < len(log):
        k = rng.choice([1, 1, 2, 3, rng.randint(1, len(log))])
        out.append(log[i : i + k])
        i += k
    return out


def _check_log(seed: int) -> None:
    log = _random_log(seed)
    want = one_by_one(log)
    assert_same_state(fold(log), want)
    # The same log folded in pieces onto the state so far, each piece by whichever path fold picks.
    rng = random.Random(seed + 1)
    state = EMPTY
    for piece in _chunks(rng, log):
        state = fold(piece, state)
    assert_same_state(state, want)
    # Each run's events through fold_run alone.
    for run_id, run in want.runs.items():
        got = fold_run(None, [e for e in log if e.run_id == run_id])
        assert got is not None
        assert_same_state(State(runs=pmap({run_id: got})), State(runs=pmap({run_id: run})))


@pytest.mark.parametrize("seed", range(25))
def test_fold_equals_one_by_one_examples(seed):
    _check_log(seed)


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is in the test extras
    given = None

if given is not None:

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(seed=st.integers(0, 2**32))
    def test_fold_equals_one_by_one(seed):
        _check_log(seed)


# -- purity ---------------------------------------------------------------------------------------------


def _snapshot(state: State) -> dict[str, tuple[Any, ...]]:
    """Everything in a state, copied out of its maps (so a later change to them would show)."""
    return {
        run_id: tuple(
            dict(v) if name in MAP_FIELDS else v for name, v in zip(RunState._fields, run, strict=True)
        )
        for run_id, run in state.runs.items()
    }


@pytest.mark.parametrize("seed", range(5))
def test_fold_does_not_change_its_input(seed):
    log = _random_log(seed)
    cut = len(log) // 2
    prefix = fold(log[:cut])
    before = _snapshot(prefix)
    once = fold(log[cut:], prefix)  # large against the runs: the bulk path, thawing the prefix's runs
    twice = fold(log[cut:], prefix)
    assert _snapshot(prefix) == before
    assert_same_state(prefix, one_by_one(log[:cut]))
    assert_same_state(once, one_by_one(log))
    assert_same_state(twice, once)
    for run_id, run in prefix.runs.items():
        rest = [e for e in log[cut:] if e.run_id == run_id]
        assert fold_run(run, rest) == fold_run(run, rest)
        assert _snapshot(prefix) == before


def test_fold_run_returns_its_input_when_nothing_changes():
    log = [submitted(diamond()), *completes("a")]
    run = fold_run(None, log)
    assert run is not None
    assert fold_run(run, log) is run  # a replay: every event is a no-op
    assert fold_run(run, []) is run
    assert fold(log, State(runs=pmap({RUN: run}))).runs[RUN] is run
    assert fold_run(None, completes("a")) is None  # no submit: no run, as with apply_to_run
    assert fold(completes("a")) is EMPTY


def test_fold_run_matches_apply_to_run_on_a_big_run():
    definition = random_dag(300, random.Random(5), triggers=True)
    sim = Sim(definition, random.Random(6), fail_first={"t3", "t40"}, lose_first={"t7"}, takeover={"t9"})
    sim.run_to_end()
    want: RunState | None = None
    for e in sim.log:
        want = apply_to_run(want, e)
    got = fold_run(None, sim.log)
    assert got == want and got is not None and want is not None
    assert got.tasks._buckets == want.tasks._buckets  # laid out, and iterated, alike
    assert got.status.terminal


# -- the draft stands in for a PMap -----------------------------------------------------------------------


def test_draft_behaves_like_a_pmap():
    persistent: PMap[str, int] = pmap({"a": 1})
    draft: _Draft[str, int] = _Draft({"a": 1})
    for op, key, value in [("set", "b", 2), ("set", "a", 3), ("discard", "a", 0), ("discard", "zz", 0)]:
        if op == "set":
            persistent, returned = persistent.set(key, value), draft.set(key, value)
        else:
            persistent, returned = persistent.discard(key), draft.discard(key)
        assert returned is draft  # changed in place
        assert dict(draft) == dict(persistent)
        assert (draft.get("a"), "b" in draft, len(draft)) == (
            persistent.get("a"),
            "b" in persistent,
            len(persistent),
        )


# -- which path fold takes --------------------------------------------------------------------------------


def test_bulk_threshold():
    run = fold([submitted(random_dag(40, random.Random(1)))]).runs[RUN]
    assert _bulk_pays(None, 1)  # a run these events create: always
    assert not _bulk_pays(run, 1)
    assert not _bulk_pays(run, 4)
    assert _bulk_pays(run, 5)  # an eighth of its tasks
    assert _bulk_pays(run, 400)


def test_small_batch_into_a_big_run_goes_one_by_one(monkeypatch):
    sim = Sim(random_dag(200, random.Random(2)), random.Random(3))
    sim.schedule()
    sim.work(2)
    log = sim.log
    calls: list[int] = []
    real = state_module.fold_run

    def spy(run, events):
        calls.append(len(events))
        return real(run, events)

    monkeypatch.setattr(state_module, "fold_run", spy)
    cut = len(log) - 3
    state = fold(log[:cut])
    assert calls == [cut]  # the run is created by these events: bulk
    small = fold(log[cut:], state)
    assert calls == [cut]  # 3 events into a 200-task run: one by one
    assert_same_state(small, one_by_one(log))
    # One by one, the maps no event touched are the very same objects (structure shared).
    old, new = state.runs[RUN], small.runs[RUN]
    untouched = [n for n in MAP_FIELDS if getattr(old, n) == getattr(new, n)]
    assert untouched and all(getattr(old, n) is getattr(new, n) for n in untouched)
    # Plenty of events for the run's size: bulk.
    big = [ev(E.WORKFLOW_STARTED, ts=5.0)] * 25  # an eighth of 200
    bulk = fold(big, state)
    assert calls == [cut, 25]
    assert_same_state(bulk, one_by_one(big, state))
