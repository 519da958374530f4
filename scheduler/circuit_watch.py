"""Feeding workers' outcomes to the circuit breakers (see :mod:`nerv_cluster.circuits`).

Invariant: ``breakers`` is the fold of the cluster-wide circuits stream (refolded by each new leader)
plus the transitions this leader made since, each of which it writes (fenced) before acting on it. Only
outcomes a worker recorded count: the scheduler's own verdicts (timeouts, lost workers) say nothing
about the function.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from nerv_cluster.circuits import Breakers
from nerv_cluster.eventlog import Entry, EventLog
from nerv_cluster.model import Event, EventType
from nerv_cluster.state import State, event_time

log = logging.getLogger("nerv.scheduler")

#: Outcome events a circuit breaker counts.
OUTCOMES = frozenset(
    {EventType.TASK_COMPLETED, EventType.TASK_FAILED, EventType.TASK_RETRYING, EventType.TASK_SPAWNED}
)
#: Outcomes that count as the function working (returning a child workflow is a success of its own).
_SUCCESSES = frozenset({EventType.TASK_COMPLETED, EventType.TASK_SPAWNED})


class CircuitWatch:
    """The circuits of every task function that has a breaker."""

    def __init__(self) -> None:
        self.breakers = Breakers()

    def reload(self, eventlog: EventLog) -> None:
        """Rebuild the breakers from the circuits stream (a new leader)."""
        self.breakers = Breakers()
        for ev in eventlog.circuit_events():
            self.breakers.apply(ev)

    def observe(self, entries: Iterable[Entry], state: State, source: str) -> list[Event]:
        """Count the workers' outcomes among ``entries``; the transitions they caused (to be written)."""
        transitions = []
        for _, ev in entries:
            if ev.type not in OUTCOMES or not ev.source.startswith("worker:"):
                continue
            run = state.runs.get(ev.run_id)
            td = run.defs.get(ev.task_id) if run is not None and ev.task_id is not None else None
            if td is None or td.circuit is None:
                continue
            ok = ev.type in _SUCCESSES
            at = event_time(ev)  # on the scheduler's clock, like the cool-down's end it is compared with
            transition = self.breakers.observe(td.fn, td.circuit, ok, ev.run_id, at, source)
            if transition is not None:
                log.warning("circuit of %s: %s", td.fn, transition.type.value)
                transitions.append(transition)
        return transitions
