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

import json
import logging
from typing import Any

import redis

from nerv_cluster import constants
from nerv_cluster.errors import MalformedJobError
from nerv_cluster.intake import describe
from nerv_cluster.jobs import Job, parse_job
from nerv_cluster.scripts import Resign

log = logging.getLogger("nerv.worker")

#: Entries that are no job, refused one after the other in one wait, before the worker gives up
#: waiting (a flood of them must not keep it from its queue).
MAX_REFUSED = 100


class Handoffs:
    """A worker process's side of the hand-off: wait for a job, or stop waiting."""

    def __init__(self, client: redis.Redis, keys: constants.Keys) -> None:
        self.redis: Any = client
        self.keys = keys
        self._resign = Resign(client)

    def take(self, worker_id: str, timeout: float) -> Job | None:
        """Wait up to ``timeout`` seconds for the job handed to ``worker_id``, then stop waiting.

        A returned job is already claimed for this worker (its TASK_STARTED is recorded): run it
        without claiming. None: nothing was handed, and nothing will be until the next wait.
        """
        lst = self.keys.handoff(worker_id)
        got = self.redis.blpop([lst], timeout=timeout)
        resigned = got is None
        raw = got[1] if got is not None else self._resign(waiting=self._waiting(worker_id), handoff_list=lst)
        for _ in range(MAX_REFUSED):
            if raw is None:  # (an empty entry is no job: refused below, like any other)
                return None
            job = self._decode(worker_id, raw)
            if job is not None:
                # A job was handed: the flag was consumed with it, so there is nothing else to resign.
                return job
            # Not the scheduler's (only it consumes the flag when it hands a job): stop waiting as if
            # nothing came, or take the job it handed meanwhile.
            if not resigned:
                raw, resigned = self._resign(waiting=self._waiting(worker_id), handoff_list=lst), True
            else:
                raw = self.redis.lpop(lst)
        return None

    def _waiting(self, worker_id: str) -> str:
        return self.keys.handoff_waiting(worker_id)

    @staticmethod
    def _decode(worker_id: str, raw: Any) -> Job | None:
        """The job of a hand-off entry; None, with a warning, for an entry that is none."""
        try:
            return parse_job(json.loads(raw))
        except (ValueError, TypeError, RecursionError, MalformedJobError) as exc:
            log.warning("refused a hand-off entry for %s that is not a job: %s", worker_id, describe(exc))
            return None
