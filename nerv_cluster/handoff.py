"""Direct hand-off of a chain's next job to the worker process that just finished the one before it.

A Celery message takes several milliseconds from ``send_task`` to the start of the task on this
machine's workers (the consumer, prefetch bookkeeping, the pool's pipe), which is most of the time of
a hop along a chain. When the scheduler dispatches a job whose success alone makes a dependent on the
same queue ready, it marks the job (``Job.handoff``). The worker process that runs it records the
outcome saying it waits (``finish.lua`` sets its waiting flag), then blocks for up to
``HANDOFF_WAIT_S`` on its own Redis list. The scheduler, folding that outcome, records the dependent as
dispatched (fenced, as always) and, in the same round trip, consumes the worker's waiting flag, claims
the attempt for that worker and pushes the job onto its list (``fenced_append.lua``).

Nothing is lost and nothing runs twice. A worker that stops waiting deletes its flag atomically
against the scheduler (``resign.lua``): either the flag was still there, and the scheduler then sends
the job through Celery, or the job is already on the list, claimed for this worker, and the worker runs
it. A worker that dies holding a handed job is a lost worker like any other: its heartbeat goes and
the scheduler's watchdog dispatches a new attempt.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from nerv_cluster import constants
from nerv_cluster.errors import JobSignatureError, MalformedJobError
from nerv_cluster.jobs import Job
from nerv_cluster.scripts import Resign
from nerv_cluster.signing import WorkerSigner, claimed_id

log = logging.getLogger("nerv.worker")

#: Entries that are no job of the scheduler's, refused one after the other in one wait, before the
#: worker stops waiting (a flood of them must not keep it from its queue).
MAX_REFUSED = 100
#: Entries popped after the worker found the scheduler handed it a job (the flag consumed), looking for
#: that job behind entries that are no job: the job was pushed before anything queued behind it, so only
#: what a forger pushed before the hand-off stands in front; a bound all the same.
MAX_DRAINED = 10_000


class Handoffs:
    """A worker process's side of the hand-off: wait for a job, or stop waiting."""

    def __init__(self, client: redis.Redis, keys: constants.Keys, signing: str = "") -> None:
        self.redis: Any = client
        self.keys = keys
        self._resign = Resign(client)
        #: ``NERV_SIGNING_KEY`` ('' for the cluster's key in Redis), read into a Signer on first use.
        self._signer = WorkerSigner(signing, client, keys)

    def take(self, worker_id: str, timeout: float) -> Job | None:
        """Wait up to ``timeout`` seconds for the job handed to ``worker_id``, then stop waiting.

        A returned job is already claimed for this worker (its TASK_STARTED is recorded): run it
        without claiming. None: nothing was handed, and nothing will be until the next wait. An entry
        on the list that the scheduler did not sign, was altered, or is no job at all (an empty one
        too) is refused (logged, not run) and the wait goes on, for at most ``MAX_REFUSED`` of them;
        a job handed meanwhile is still found behind them when the worker stops waiting.
        """
        lst = self.keys.handoff(worker_id)
        waiting = self.keys.handoff_waiting(worker_id)
        deadline = time.monotonic() + timeout
        for _ in range(MAX_REFUSED):
            left = deadline - time.monotonic()
            got = self.redis.blpop([lst], timeout=max(left, 0.001)) if left > 0 else None
            if got is None:
                break
            job = self._open(got[1], worker_id)
            if job is not None:
                # A job was handed: the flag was consumed with it, so there is nothing else to resign.
                return job
            # A refused entry (not the scheduler's): the hand-off may still come, wait on.
        return self._stop_waiting(worker_id, waiting, lst)

    def _stop_waiting(self, worker_id: str, waiting: str, lst: str) -> Job | None:
        """Resign; when the scheduler consumed the flag first, the job it handed is on the list, maybe
        behind entries that are no job of its own: pop on until it (taking only the first entry, as
        before, lost a job handed behind more than ``MAX_REFUSED`` refused ones: its attempt, claimed
        for this live worker, was never run)."""
        raw = self._resign(waiting=waiting, handoff_list=lst)
        for _ in range(MAX_DRAINED):
            if raw is None:
                return None
            job = self._open(raw, worker_id)
            if job is not None:
                return job
            raw = self.redis.lpop(lst)
        log.warning(
            "hand-off list of %s: over %d entries that are no job; stopped looking", worker_id, MAX_DRAINED
        )
        return None

    def _open(self, raw: Any, worker_id: str) -> Job | None:
        """The job of a handed message, or None (logged) when the scheduler did not sign it or it is
        no job."""
        try:
            return Job.from_wire(raw, self._signer.get())
        except (JobSignatureError, MalformedJobError, KeyError, TypeError, ValueError, RecursionError) as exc:
            log.warning("refused job %s handed to %s: %s; not run", claimed_id(raw), worker_id, exc)
            return None
