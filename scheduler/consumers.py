"""Worker processes that consume messages, and the prefetched jobs a dead one takes with it.

A Celery worker's consuming process reserves messages ahead of running them (prefetch). With the
Redis transport, those messages sit in kombu's unacked hash until the visibility timeout (an hour by
default) when the process dies whole, even if it never started any of them, so no RUNNING attempt
tells the scheduler anything is wrong.

Invariant: every consuming process registers itself, with its queues, in ``Keys.workers`` on every
heartbeat and deregisters on a clean stop (its reserved messages go back to the queue then). A
registered process whose heartbeat has been missing for ``LOST_WORKER_GRACE_S`` died: the scheduler
resends the queued (dispatched, not started) jobs of *its* queues, and forgets it (a live process that
was only slow re-registers with its next beat). Copies are harmless: a worker claims an attempt once.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping

from nerv_cluster import constants
from nerv_cluster.eventlog import EventLog
from nerv_cluster.jobs import Job
from nerv_cluster.state import State
from scheduler.decisions import in_flight

log = logging.getLogger("nerv.scheduler")


def registered_queues(description: str) -> list[str]:
    """The queues in a registration's JSON description (none when it cannot be read)."""
    try:
        queues = json.loads(description).get("queues", [])
    except (ValueError, AttributeError):
        return []
    return [str(q) for q in queues] if isinstance(queues, list) else []


def queued_on(state: State, queues: Collection[str]) -> list[tuple[Job, str]]:
    """The dispatched-but-not-started jobs of every run that go to one of ``queues``."""
    if not queues:
        return []
    return [(job, q) for run in state.runs.values() for job, q in in_flight(run) if q in queues]


class Consumers:
    """Watches the registered consuming processes; owns when each was first seen without heartbeat."""

    def __init__(self, log_: EventLog) -> None:
        self.log = log_
        self._missing_since: dict[str, float] = {}

    def judge(
        self, registered: Mapping[str, str], alive: Mapping[str, bool], now: float
    ) -> dict[str, list[str]]:
        """Worker id -> queues of the registered processes lost by ``now`` (pure: no I/O).

        ``registered``: worker id -> JSON description; ``alive``: whether its heartbeat exists.
        """
        missing = {w for w in registered if not alive.get(w, False)}
        self._missing_since = {w: self._missing_since.get(w, now) for w in missing}
        return {
            w: registered_queues(registered[w])
            for w in missing
            if now - self._missing_since[w] >= constants.LOST_WORKER_GRACE_S
        }

    def sweep(self, state: State, now: float) -> list[tuple[Job, str]]:
        """The jobs to resend for the consuming processes lost by ``now``; forgets those processes."""
        registered: dict[str, str] = self.log.redis.hgetall(self.log.keys.workers)
        if not registered:
            self._missing_since.clear()
            return []
        workers = list(registered)
        pipe = self.log.redis.pipeline(transaction=False)
        for w in workers:
            pipe.exists(self.log.keys.heartbeat(w))
        alive = {w: bool(ok) for w, ok in zip(workers, pipe.execute(), strict=True)}
        lost = self.judge(registered, alive, now)
        if not lost:
            return []
        self.log.redis.hdel(self.log.keys.workers, *lost)
        for w in lost:
            self._missing_since.pop(w, None)
        queues = {q for qs in lost.values() for q in qs}
        jobs = queued_on(state, queues)
        log.warning(
            "worker process(es) %s lost with their prefetched messages: resending %d queued jobs of %s",
            ", ".join(sorted(lost)),
            len(jobs),
            ", ".join(sorted(queues)) or "no queue",
        )
        return jobs
