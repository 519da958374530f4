"""Due times: ready tasks that wait on the scheduler's clock (retry delays today).

Invariant: each ``(run, task, attempt)`` is in the heap at most once, and :meth:`Timers.release` hands
back the runs of every entry due by ``now`` and forgets those entries. The heap is only a reminder of
*when* to look at a run again: whether a task may start is decided from the folded state when the run is
looked at (``scheduler.decisions.decide``), so a lost or an extra reminder can delay a decision by one
sweep but never make a wrong one, and a new leader rebuilds the heap from ``decide`` itself.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

#: (due time on the scheduler's clock, run id, task id, attempt).
Due = tuple[float, str, str, int]


class Timers:
    """A heap of due times, one entry per attempt."""

    def __init__(self) -> None:
        self._heap: list[Due] = []
        self._keys: set[tuple[str, str, int]] = set()

    def add(self, items: Iterable[Due]) -> None:
        """Remember when each attempt becomes due (an attempt already remembered is kept as it is)."""
        for item in items:
            key = item[1:]
            if key not in self._keys:
                self._keys.add(key)
                heapq.heappush(self._heap, item)

    def next_due(self) -> float | None:
        """The earliest due time, if any."""
        return self._heap[0][0] if self._heap else None

    def release(self, now: float) -> set[str]:
        """Forget every entry due by ``now``; the ids of their runs, to decide for again."""
        runs: set[str] = set()
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, rid, tid, attempt = heapq.heappop(heap)
            self._keys.discard((rid, tid, attempt))
            runs.add(rid)
        return runs

    def clear(self) -> None:
        """Forget everything (a new leader, or one stepping down)."""
        self._heap, self._keys = [], set()

    def __len__(self) -> int:
        return len(self._heap)
