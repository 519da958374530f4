"""Circuit breakers per task function (the seed's circuit breaking), as a fold over CIRCUIT_* events.

The scheduler counts consecutive failed attempts of each function that has a :class:`CircuitBreaker`.
At the threshold the circuit opens: ready tasks of that function fail fast with
:class:`CircuitOpenError` instead of being dispatched. After the cool-down one trial attempt runs (half
open); its success closes the circuit, its failure opens it again. Every transition is an event,
written to the run that caused it and to the cluster-wide circuits stream, which a new leader refolds.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from pyrsistent import PMap, pmap

from nerv_cluster.model import CircuitBreaker, Event, EventType


class CircuitState(StrEnum):
    """Where a circuit is."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


CIRCUIT_EVENTS = frozenset(
    {EventType.CIRCUIT_OPENED, EventType.CIRCUIT_HALF_OPENED, EventType.CIRCUIT_CLOSED}
)


@dataclass(frozen=True, slots=True)
class Circuit:
    """One function's circuit. ``until``: end of the cool-down (open) or of the trial's grace (half open)."""

    state: CircuitState = CircuitState.CLOSED
    failures: int = 0
    until: float = 0.0
    trial: str = ""


def apply_circuit(circuits: PMap[str, Circuit], ev: Event) -> PMap[str, Circuit]:
    """Fold one CIRCUIT_* event (other events change nothing). Pure and idempotent."""
    fn = str(ev.data.get("fn", ""))
    if ev.type is EventType.CIRCUIT_OPENED:
        return circuits.set(
            fn, Circuit(CircuitState.OPEN, int(ev.data.get("failures", 0)), float(ev.data["until"]))
        )
    if ev.type is EventType.CIRCUIT_HALF_OPENED:
        old = circuits.get(fn, Circuit())
        return circuits.set(
            fn, Circuit(CircuitState.HALF_OPEN, old.failures, float(ev.data["until"]), str(ev.data["trial"]))
        )
    if ev.type is EventType.CIRCUIT_CLOSED:
        return circuits.set(fn, Circuit())
    return circuits


class Breakers:
    """The scheduler's circuits. Methods return the transition event they made (already applied)."""

    def __init__(self) -> None:
        self.circuits: PMap[str, Circuit] = pmap()

    def apply(self, ev: Event) -> None:
        """Fold a CIRCUIT_* event in (from the circuits stream, at leadership start)."""
        self.circuits = apply_circuit(self.circuits, ev)

    def _emit(self, kind: EventType, run_id: str, now: float, source: str, **data: object) -> Event:
        ev = Event(kind, run_id, data=data, ts=now, source=source)
        self.apply(ev)
        return ev

    def get(self, fn: str) -> Circuit:
        """The circuit of a function (closed when never seen)."""
        return self.circuits.get(fn, Circuit())

    def observe(
        self, fn: str, cfg: CircuitBreaker, ok: bool, run_id: str, now: float, source: str
    ) -> Event | None:
        """Count an attempt's outcome; open or close the circuit when that changes its state."""
        c = self.get(fn)
        if ok:
            if c.state is not CircuitState.CLOSED:
                return self._emit(EventType.CIRCUIT_CLOSED, run_id, now, source, fn=fn)
            if c.failures:
                self.circuits = self.circuits.set(fn, replace(c, failures=0))
            return None
        failures = c.failures + 1
        if c.state is CircuitState.HALF_OPEN or (c.state is CircuitState.CLOSED and failures >= cfg.failures):
            return self._emit(
                EventType.CIRCUIT_OPENED,
                run_id,
                now,
                source,
                fn=fn,
                failures=failures,
                until=now + cfg.cooldown,
            )
        self.circuits = self.circuits.set(fn, replace(c, failures=failures))
        return None

    def admit(
        self, fn: str, cfg: CircuitBreaker, job_id: str, run_id: str, now: float, source: str
    ) -> tuple[bool, Event | None]:
        """May this job be dispatched? After the cool-down the first job asking becomes the trial."""
        c = self.get(fn)
        if c.state is CircuitState.CLOSED or (c.state is CircuitState.HALF_OPEN and c.trial == job_id):
            return True, None
        if now < c.until:
            return False, None
        # Cool-down over (or the last trial never reported back): this job is the trial.
        trial = self._emit(
            EventType.CIRCUIT_HALF_OPENED, run_id, now, source, fn=fn, trial=job_id, until=now + cfg.cooldown
        )
        return True, trial
