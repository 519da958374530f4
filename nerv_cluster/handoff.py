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
from nerv_cluster.errors import JobSignatureError
from nerv_cluster.jobs import Job
from nerv_cluster.scripts import Resign
from nerv_cluster.signing import Signer, claimed_id, signing_key

log = logging.getLogger("nerv.worker")


class Handoffs:
    """A worker process's side of the hand-off: wait for a job, or stop waiting."""

    def __init__(self, client: redis.Redis, keys: constants.Keys, signing: str = "") -> None:
        self.redis: Any = client
        self.keys = keys
        self._resign = Resign(client)
        #: ``NERV_SIGNING_KEY`` ('' for the cluster's key in Redis), read into a Signer on first use.
        self._signing = signing
        self._signer: Signer | None = None

    def take(self, worker_id: str, timeout: float) -> Job | None:
        """Wait up to ``timeout`` seconds for the job handed to ``worker_id``, then stop waiting.

        A returned job is already claimed for this worker (its TASK_STARTED is recorded): run it
        without claiming. None: nothing was handed, and nothing will be until the next wait. A
        message on the list that the scheduler did not sign, or that was altered, is refused (logged,
        not run) and the wait goes on.
        """
        lst = self.keys.handoff(worker_id)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            got = self.redis.blpop([lst], timeout=max(left, 0.001)) if left > 0 else None
            raw = (
                got[1]
                if got is not None
                else self._resign(waiting=self.keys.handoff_waiting(worker_id), handoff_list=lst)
            )
            if not raw:
                return None
            job = self._open(raw, worker_id)
            if job is not None or got is None:
                return job
            # A refused message (not the scheduler's): the hand-off may still come, wait on.

    def _open(self, raw: str, worker_id: str) -> Job | None:
        """The job of a handed message, or None (logged) when the scheduler did not sign it."""
        if self._signer is None:
            self._signer = Signer(signing_key(self._signing, self.redis, self.keys))
        try:
            return Job.from_wire(raw, self._signer)
        except (JobSignatureError, KeyError, TypeError, ValueError) as exc:
            log.warning("refused job %s handed to %s: %s; not run", claimed_id(raw), worker_id, exc)
            return None
        # A job was handed: the flag was consumed with it, so there is nothing else to resign.
        if self._signer is None:
            self._signer = Signer(signing_key(self._signing, self.redis, self.keys))
        try:
            return Job.from_wire(raw, self._signer)
        except (JobSignatureError, KeyError, TypeError, ValueError) as exc:
            log.warning("refused job %s handed to %s: %s; not run", claimed_id(raw), worker_id, exc)
            return None
