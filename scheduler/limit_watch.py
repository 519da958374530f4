"""Feeding run-time limits (``client.set_limit``) to the scheduler's gate (see :mod:`nerv_cluster.limits`).

Invariant: the gate's run-time limits are the fold of the limits stream, oldest first, up to
``cursor``: a new leader refolds the whole stream; a LIMIT_SET seen in the feed only says "read the
stream again", so the feed's copy and the stream's are never both applied out of order.
"""

from __future__ import annotations

from collections.abc import Iterable

from nerv_cluster.eventlog import Entry, EventLog
from nerv_cluster.limits import Gate
from nerv_cluster.model import EventType


class LimitWatch:
    """Reads the limits stream into a gate."""

    def __init__(self, gate: Gate) -> None:
        self.gate = gate
        self.cursor = "0-0"

    def reload(self, eventlog: EventLog) -> None:
        """Refold the whole limits stream (a new leader)."""
        self.gate.overrides.clear()
        self.cursor = "0-0"
        self._read(eventlog)

    def observe(self, eventlog: EventLog, entries: Iterable[Entry]) -> bool:
        """Read the stream again when ``entries`` hold a LIMIT_SET; whether any limit changed."""
        if not any(ev.type is EventType.LIMIT_SET for _, ev in entries):
            return False
        return self._read(eventlog)

    def _read(self, eventlog: EventLog) -> bool:
        batch = eventlog.limit_events(self.cursor)
        for _, ev in batch:
            if ev.type is EventType.LIMIT_SET:
                self.gate.apply_limit_event(ev)
        if batch.upto:
            self.cursor = batch.upto
        return bool(batch)
