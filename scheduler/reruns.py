"""Taking back a run a rerun reopened (see :mod:`nerv_cluster.rerun`).

The scheduler forgets a run once it is finished (memory stays bounded by the active runs). When the feed
brings a WORKFLOW_RERUN_REQUESTED for a run the state does not hold, the run is loaded again from its
checkpoint and log, a one-run refold, and goes on from there; a new leader finds it in the active set
(``rerun.lua`` put it back) like any run.

Invariant: a loaded run's state is the fold of its whole log as read *after* the feed batch that named
it, so it holds every event of that batch for the run and maybe later ones; the batch's events of a
loaded run are therefore not folded again (folding them after later events could apply a stale one,
e.g. a cancel request logged before the rerun, that the in-order fold ignored).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from nerv_cluster import state as st
from nerv_cluster.eventlog import EventLog
from nerv_cluster.model import Event, EventType
from scheduler.checkpointer import Position
from scheduler.takeover import load_runs

log = logging.getLogger("nerv.scheduler")


def reopened(state: st.State, events: Iterable[Event]) -> list[str]:
    """Ids of runs the ``events`` ask to rerun that ``state`` does not hold (in order, once each)."""
    runs = state.runs
    found: dict[str, None] = {}
    for ev in events:
        if ev.type is EventType.WORKFLOW_RERUN_REQUESTED and ev.run_id not in runs:
            found[ev.run_id] = None
    return list(found)


def take_back(
    eventlog: EventLog, state: st.State, events: Iterable[Event]
) -> tuple[st.State, dict[str, Position]]:
    """``state`` with the runs ``events`` reopened loaded from their logs (read now, after the events),
    and each loaded run's checkpoint position (its keys: the runs loaded; a run whose log is gone is
    left out)."""
    missing = reopened(state, events)
    if not missing:
        return state, {}
    started = time.monotonic()
    loaded = load_runs(eventlog, missing)
    took = time.monotonic() - started
    for rid, run in loaded.runs.items():
        log.info(
            "run %r reopened by rerun %d: %s (%d tasks; %d runs loaded back from %d events in %.3fs)",
            rid,
            run.reruns,
            run.status.value,
            run.total,
            len(loaded.runs),
            loaded.events,
            took,
        )
    return st.State(runs=state.runs.update(loaded.runs)), loaded.positions
