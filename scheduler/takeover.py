"""Becoming leader: rebuild the state of every active run, then find the jobs to send again.

Invariant: the state a new leader acts on equals the fold of every active run's whole log, whether it
came from a checkpoint plus the entries after it or from the log alone; and the feed cursor it starts
from was read *before* the logs, so an event written meanwhile is both in a log and after the cursor
(folding it twice changes nothing: every handler is idempotent), never in neither. That cursor is the
feed position the last leader recorded with its last transcription (:mod:`scheduler.transcribe`):
every worker event after it may be in no log yet, and is read, checked and transcribed again, so an
outcome a worker recorded is never lost with a leader that died before transcribing it. Without a
recorded position (a cluster that never had a transcribing leader) it is the feed's tail.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass

from pyrsistent import pmap

from nerv_cluster import state as st
from nerv_cluster.eventlog import EventLog
from nerv_cluster.jobs import Job
from scheduler import checkpointer
from scheduler.decisions import in_flight


@dataclass(frozen=True, slots=True)
class Refold:
    """What a refold found: the state, the feed cursor to follow from, each run's checkpoint position,
    for the log line the events replayed and the checkpoints used, and the active runs whose log holds
    no submission this version can read (to be closed: nothing can ever run for them)."""

    state: st.State
    cursor: str
    positions: dict[str, checkpointer.Position]
    events: int
    from_checkpoints: int
    unreadable: tuple[str, ...] = ()


def refold(eventlog: EventLog, on_progress: Callable[[], None]) -> Refold:
    """Rebuild the state of the active runs from their checkpoints and logs. ``on_progress`` is called
    after each run (a long refold is progress, not a stalled loop)."""
    # The refold allocates the whole state at once: cyclic GC passes over it would be a fifth of the
    # time (measured on a 1M-event log), and they find nothing (the state holds no cycles).
    paused = gc.isenabled()
    gc.disable()
    try:
        # Read first: later events are both in the logs and after it.
        cursor = eventlog.transcribed_position() or eventlog.feed_tail()
        run_ids = sorted(eventlog.active_runs())
        loaded = load_runs(eventlog, run_ids, on_progress)
    finally:
        if paused:
            gc.enable()
    runs, positions = loaded.runs, loaded.positions
    # The state is long-lived: later full collections need not walk it again.
    gc.freeze()
    # submit.lua registers a run and writes its submission in one step, so an active run without a
    # state has a submission no one can read (a corrupted entry): left active, it would be read again
    # by every refold, for ever.
    unreadable = tuple(rid for rid in run_ids if rid not in runs)
    return Refold(
        st.State(runs=pmap(runs)), cursor, positions, loaded.events, loaded.from_checkpoints, unreadable
    )


@dataclass(frozen=True, slots=True)
class Loaded:
    """Runs folded from their checkpoints and logs: each run's state and checkpoint position, and for
    the log line the events replayed and the checkpoints used."""

    runs: dict[str, st.RunState]
    positions: dict[str, checkpointer.Position]
    events: int
    from_checkpoints: int


def load_runs(
    eventlog: EventLog, run_ids: list[str], on_progress: Callable[[], None] = lambda: None
) -> Loaded:
    """Fold these runs from their checkpoints and the log entries after them (a run without a readable
    submission is left out); ``on_progress`` after each run. Also how the scheduler takes back a run a
    rerun reopened (:mod:`scheduler.reruns`)."""
    bases = checkpointer.load(eventlog, run_ids)
    positions: dict[str, checkpointer.Position] = {}
    runs: dict[str, st.RunState] = {}
    n = 0
    after = {rid: base[0] for rid, base in bases.items()}
    for run_id, entries in eventlog.read_runs(run_ids, after=after):
        upto, count, base = bases.get(run_id, ("", 0, None))
        run = st.fold_run(base, [ev for _, ev in entries])
        n += len(entries)
        if run is not None:
            runs[run_id] = run
            # The state at the end of the log read: where the next checkpoint of this run starts.
            positions[run_id] = (entries[-1][0] if entries else upto, count + len(entries), run)
        on_progress()
    return Loaded(runs, positions, n, len(bases))


def in_flight_jobs(state: st.State) -> list[tuple[Job, str]]:
    """Every dispatched-but-not-started job of every run: a new leader sends them again, since the old
    one may have died between recording and sending them (copies are harmless: a worker claims an
    attempt once)."""
    return [job for run in state.runs.values() for job in in_flight(run)]
