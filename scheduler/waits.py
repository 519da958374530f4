"""The deadlines of durable waits (``wait_for`` timeouts, ``sleep``, ``sleep_until``): a timer heap.

Invariant: every WAITING task with a deadline the scheduler holds has an entry here (added when its
TASK_WAITING is folded, or by :meth:`WaitRoom.rebuild` when this scheduler becomes leader), and each
``(run, task, attempt)`` at most once. The heap only says *when* to look: what ends a node is decided
by :func:`nerv_cluster.waits.expire` from the folded state, so an entry for a node that ended meanwhile
(its signal came, it was cancelled) does nothing, and the deadline itself is the folded one (the
TASK_WAITING's logged time plus the timeout), the same after any refold. Nothing is polled: the loop
blocks until :meth:`next_due`. O(log n) per wait; a takeover rebuilds in O(waiting tasks).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from nerv_cluster import state as st
from nerv_cluster import waits
from nerv_cluster.model import Event, EventType, TaskStatus

#: (deadline on Redis's clock, run id, task id, attempt).
_Entry = tuple[float, str, str, int]


class WaitRoom:
    """The deadlines of the WAITING tasks of the runs this scheduler leads."""

    def __init__(self) -> None:
        self._heap: list[_Entry] = []
        self._keys: set[tuple[str, str, int]] = set()

    def _push(self, run: st.RunState, tid: str) -> None:
        ts = run.tasks.get(tid)
        if ts is None or ts.status is not TaskStatus.WAITING or ts.due_at is None:
            return
        key = (run.run_id, tid, ts.attempt)
        if key not in self._keys:
            self._keys.add(key)
            heapq.heappush(self._heap, (ts.due_at, *key))

    def observe(self, events: Iterable[Event], state: st.State) -> None:
        """Remember the deadline of each node these (folded) events made WAITING."""
        runs = state.runs
        for ev in events:
            if ev.type is EventType.TASK_WAITING and ev.task_id is not None:
                run = runs.get(ev.run_id)
                if run is not None:
                    self._push(run, ev.task_id)

    def rebuild(self, state: st.State) -> None:
        """Every deadline of ``state`` (a new leader's refolded one)."""
        self.clear()
        for run in state.runs.values():
            for tid in run.waiting:
                self._push(run, tid)

    def next_due(self) -> float | None:
        """The earliest deadline, if any."""
        return self._heap[0][0] if self._heap else None

    def expired(self, now: float, state: st.State, source: str) -> list[Event]:
        """The events that end every node whose deadline passed by ``now`` (those entries are
        forgotten; a node that ended otherwise gets none)."""
        out: list[Event] = []
        heap, runs = self._heap, state.runs
        while heap and heap[0][0] <= now:
            _, rid, tid, attempt = heapq.heappop(heap)
            self._keys.discard((rid, tid, attempt))
            run = runs.get(rid)
            if run is not None and not run.cancel_requested:
                ts = run.tasks.get(tid)
                if ts is not None and ts.status is TaskStatus.WAITING and (ts.due_at or 0) > now:
                    # Its deadline moved later (the log dated the TASK_WAITING after this scheduler
                    # did): come back then.
                    self._push(run, tid)
                    continue
                ev = waits.expire(run, tid, attempt, now, source)
                if ev is not None:
                    out.append(ev)
        return out

    def clear(self) -> None:
        """Forget everything (a new leader, or one stepping down)."""
        self._heap, self._keys = [], set()

    def __len__(self) -> int:
        return len(self._heap)
