"""The console's reads: runs folded from their logs, kept up to date incrementally.

Invariant: every state the console shows is the fold of a prefix of the run's log (the whole log as
read now, or up to a cursor). The store keeps the most recently viewed runs folded (with the cursor
they are folded up to) and on each view folds only the entries logged since, so a page of a 10,000-task
run costs one ``XRANGE`` of what is new, not a refold of its 40,000 events. It holds no other truth: a
run that expired is dropped, and a fresh store refolds what it needs.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, NamedTuple

from pyrsistent import pmap

from nerv_cluster import constants, history
from nerv_cluster import state as st
from nerv_cluster.client import Client
from nerv_cluster.console import views
from nerv_cluster.errors import RunNotFoundError
from nerv_cluster.model import Event


class Folded(NamedTuple):
    """A run folded up to ``cursor`` (its log's entry id; ``"0-0"`` before any), from ``events``
    decoded events."""

    run: st.RunState
    cursor: str
    events: int


class RunStore:
    """Folded runs for the console, by run id; thread-safe (handlers run in a thread pool)."""

    def __init__(self, client: Client, capacity: int = constants.UI_RUN_CACHE) -> None:
        self.client = client
        self.log = client.log
        self.capacity = capacity
        self._runs: OrderedDict[str, Folded] = OrderedDict()
        self._summaries: OrderedDict[str, tuple[str, dict[str, Any]]] = OrderedDict()
        self._lock = threading.Lock()

    def folded(self, run_id: str) -> Folded:
        """The run as logged now, with the cursor and event count it is folded up to.

        :class:`RunNotFoundError` for an unknown or expired run.
        """
        with self._lock:
            known = self._runs.get(run_id)
        if known is None:
            run: st.RunState | None = None
            cursor, count = "0-0", 0
        else:
            run, cursor, count = known
        events: list[Event] = []
        for entry_id, ev in self.log.read_run(run_id, after=cursor):
            events.append(ev)
            cursor = entry_id
        if events:
            count += len(events)
            if run is None:
                run = st.fold_run(None, events)
            else:
                run = st.fold(events, st.State(runs=pmap({run_id: run}))).runs.get(run_id, run)
        if run is None:
            self.forget(run_id)
            raise RunNotFoundError(
                f"no run {run_id!r} (never submitted, or expired after its retention time)"
            )
        if known is not None and not events and not self.log.run_exists(run_id):
            self.forget(run_id)  # expired since it was folded
            raise RunNotFoundError(f"no run {run_id!r} (expired after its retention time)")
        folded = Folded(run, cursor, count)
        with self._lock:
            self._runs[run_id] = folded
            self._runs.move_to_end(run_id)
            while len(self._runs) > self.capacity:
                self._runs.popitem(last=False)
        return folded

    def state(self, run_id: str, at: str | None = None) -> st.RunState:
        """The run now, or (``at``: a cursor or a count of events) as it was then."""
        if at is None or at == "":
            return self.folded(run_id).run
        return history.read_state(self.log, run_id, history.parse_position(at))

    def point(self, run_id: str, at: str) -> history.Point:
        """The run as it was at ``at`` (a cursor or a count of events), with the last event folded and
        its count."""
        return history.read_point(self.log, run_id, history.parse_position(at))

    def state_after(self, run_id: str, cursor: str) -> st.RunState:
        """The run right after entry ``cursor``: where an event stream resumes. The folded run when that
        is where it stands (a page opening its stream at the cursor it was drawn at: no refold), else
        the fold up to the cursor."""
        folded = self.folded(run_id)
        if folded.cursor == cursor:
            return folded.run
        return history.read_state(self.log, run_id, cursor)

    def forget(self, run_id: str) -> None:
        """Drop a run from memory (it expired)."""
        with self._lock:
            self._runs.pop(run_id, None)

    def runs(self, limit: int = constants.UI_RUNS_LIMIT) -> list[dict[str, Any]]:
        """Summaries of the newest runs, newest first (expired ones left out).

        A summary is kept with the id of the log entry it was folded up to: a run whose log has not
        grown since (every finished run) costs one ``XREVRANGE`` in a pipeline, not a fold, so the runs
        list refreshing every few seconds stays cheap however big its runs are.
        """
        ids = [run_id for run_id, _ in self.client.runs(limit)]
        pipe = self.client.redis.pipeline(transaction=False)
        for run_id in ids:
            pipe.xrevrange(self.client.keys.log(run_id), count=1)
        out: list[dict[str, Any]] = []
        for run_id, tail in zip(ids, pipe.execute(), strict=True):
            if not tail:
                continue  # expired
            last = str(tail[0][0])
            with self._lock:
                known = self._summaries.get(run_id)
            if known is not None and known[0] == last:
                out.append(known[1])
                continue
            try:
                summary = views.run_summary(self.folded(run_id).run)
            except RunNotFoundError:
                continue
            with self._lock:
                self._summaries[run_id] = (last, summary)
                self._summaries.move_to_end(run_id)
                while len(self._summaries) > constants.UI_SUMMARY_CACHE:
                    self._summaries.popitem(last=False)
            out.append(summary)
        return out

    def log_page(self, run_id: str, after: str = "-", limit: int = 500) -> list[dict[str, Any]]:
        """Up to ``limit`` events of the run's log after cursor ``after``, as event log lines."""
        self.log.require_run(run_id)
        out: list[dict[str, Any]] = []
        for _, ev in self.log.read_run(run_id, after=after, count=min(limit, 10_000)):
            out.append(views.event_dict(ev))
            if len(out) >= limit:
                break
        return out

    def log_tail(self, run_id: str, limit: int = 500) -> list[dict[str, Any]]:
        """The last ``limit`` events of the run's log, oldest first."""
        self.log.require_run(run_id)
        return [views.event_dict(ev) for _, ev in self.log.tail_run(run_id, limit)]


__all__ = ["Folded", "RunStore"]
