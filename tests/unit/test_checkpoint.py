"""Checkpoints: encoding a run's folded state and decoding it back must give the very same state."""

from __future__ import annotations

import json
import random

import pytest
from pyrsistent import PMap

from nerv_cluster import checkpoint
from nerv_cluster.errors import MalformedCheckpointError
from nerv_cluster.model import EventType
from nerv_cluster.state import RunState, apply_to_run, fold, fold_run
from tests.unit.helpers import RUN, Sim, ev, random_dag, run_of, submitted


def _same(a: RunState, b: RunState) -> None:
    for name in RunState._fields:
        assert getattr(a, name) == getattr(b, name), name
    for name in ("tasks", "ready", "doomed", "running", "queued"):
        assert isinstance(getattr(b, name), PMap), name
    assert a == b


def _through_json(run: RunState) -> RunState:
    return checkpoint.decode(json.loads(json.dumps(checkpoint.encode(run))))


@pytest.mark.parametrize("seed", range(4))
def test_every_prefix_of_a_simulated_run_round_trips(seed: int) -> None:
    rng = random.Random(seed)
    definition = random_dag(80, rng, triggers=seed % 2 == 1)
    ids = [t.id for t in definition.tasks]
    sim = Sim(
        definition, rng, fail_first=ids[::9], fail_always=ids[4::17], lose_first=ids[2::13], retry_delay=0.5
    )
    sim.run_to_end()
    run = None
    for i, event in enumerate(sim.log):
        run = apply_to_run(run, event)
        assert run is not None
        if i % 7 == 0 or i == len(sim.log) - 1:
            _same(run, _through_json(run))


def test_a_checkpoint_plus_the_rest_of_the_log_is_the_whole_fold() -> None:
    rng = random.Random(3)
    sim = Sim(random_dag(60, rng), rng)
    sim.run_to_end()
    cut = len(sim.log) // 2
    at_cut = fold_run(None, sim.log[:cut])
    assert at_cut is not None
    resumed = fold_run(_through_json(at_cut), sim.log[cut:])
    assert resumed is not None
    _same(run_of(fold(sim.log)), resumed)


def test_cancel_and_errors_survive_the_round_trip() -> None:
    rng = random.Random(5)
    definition = random_dag(30, rng)
    sim = Sim(definition, rng, fail_always=[definition.tasks[0].id])
    sim.schedule()
    sim.work(3)
    sim.emit([ev(EventType.WORKFLOW_CANCEL_REQUESTED, reason="enough")])
    run = sim.run
    assert run.cancel_requested and any(ts.error is not None for ts in run.tasks.values())
    _same(run, _through_json(run))


def test_unreadable_checkpoints_are_refused() -> None:
    run = run_of(fold([submitted(random_dag(5, random.Random(1)))]))
    good = checkpoint.encode(run)
    assert good["run_id"] == RUN
    with pytest.raises(ValueError, match="format"):
        checkpoint.decode({**good, "format": 999})
    with pytest.raises(ValueError, match="does not have"):
        checkpoint.decode({**good, "tasks": {"nope": good["tasks"].get("t0", [])}})
    first = next(iter(run.tasks))
    with pytest.raises(ValueError, match="fields"):
        checkpoint.decode({**good, "tasks": {first: ["READY"]}})
    with pytest.raises(MalformedCheckpointError, match="KeyError: 'definition'"):  # one error type for all
        checkpoint.decode({"format": checkpoint.FORMAT})
