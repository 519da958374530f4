"""The attempts one worker process holds: claimed (or about to be) and not yet given up.

Invariant: an attempt is in the record from just before this process claims it (``start.lua``, or
taking a handed job) until its outcome is recorded or the process gives it up (the outcome could not
be written, the claim was refused). So:

- a second copy of an attempt (a visibility-timeout redelivery, a new leader's resend) that reaches a
  process already running it is refused here, before Redis is asked: thread pools share one worker id
  per process, so ``start.lua`` alone cannot tell the two copies apart;
- the heartbeat publishes the record, and the scheduler's watchdog re-dispatches a RUNNING attempt
  that a live process has stopped listing (its outcome never reached the log).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable


class HeldAttempts:
    """A thread-safe set of job ids (``run:task:attempt``) held by this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: set[str] = set()

    def acquire(self, job_id: str) -> bool:
        """Add ``job_id`` unless it is held already; True when added (this caller now holds it)."""
        with self._lock:
            if job_id in self._held:
                return False
            self._held.add(job_id)
            return True

    def add(self, job_id: str) -> None:
        """Hold ``job_id`` (a job the scheduler already claimed for this process: a hand-off)."""
        with self._lock:
            self._held.add(job_id)

    def release(self, job_ids: Iterable[str]) -> None:
        """Stop holding these attempts (missing ones are no error)."""
        with self._lock:
            self._held.difference_update(job_ids)

    def snapshot(self) -> list[str]:
        """The held job ids, sorted (what the heartbeat publishes)."""
        with self._lock:
            return sorted(self._held)

    def __contains__(self, job_id: object) -> bool:
        with self._lock:
            return job_id in self._held

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)
