"""Matching finished jobs' waiting worker processes with the dependents those jobs made ready.

A worker that records a job's success with a ``handoff`` mark waits a moment for the next job of its
chain (see :mod:`nerv_cluster.handoff`). This room remembers those waiters from the feed and, when the
scheduler decides the next jobs, picks for each job at most one waiter: one that finished a dependency
of the job on the job's own queue.

Invariant: a waiter is offered at most one job, and only in the step right after its outcome was read:
every waiter not matched then is forgotten (the worker waits only ``HANDOFF_WAIT_S`` and then resigns, so
an old waiter is worth nothing). Offering is not handing: the fenced write hands a job only while the
worker's waiting flag still exists, so a waiter that already left costs a Celery message, never a job.
"""

from __future__ import annotations

from dataclasses import replace

from nerv_cluster.constants import CLAIM_KEY, HANDOFF_CLAIM_KEY
from nerv_cluster.jobs import Job
from nerv_cluster.model import Event, EventType
from nerv_cluster.outcomes import is_claim
from nerv_cluster.state import State

#: A job and its queue.
Queued = tuple[Job, str]
#: A waiting worker: its id, the Celery message it serves, the claim of the job it waits for.
Waiter = tuple[str, str, str]
#: A hand-off: the TASK_STARTED event that claims the attempt for the worker, the job, its queue.
Handoff = tuple[Event, Job, str]


class HandoffMatcher:
    """The waiters seen in this step's outcomes: run -> task -> (worker id, Celery message it serves,
    claim of the job it waits for)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._waiters: dict[str, dict[str, Waiter]] = {}

    def observe(self, ev: Event) -> None:
        """Note the waiter of a TASK_COMPLETED read from the feed, if it waits. One that names no
        well-formed claim for the job it waits for is handed nothing (its outcome's nonce was checked,
        so the claim is its own: only it can record the handed job's outcome)."""
        if ev.type is EventType.TASK_COMPLETED and ev.task_id is not None:
            waiter, claim = ev.data.get("handoff"), ev.data.get(HANDOFF_CLAIM_KEY)
            if waiter and is_claim(claim):
                where = (str(waiter), str(ev.data.get("via", "")), str(claim))
                self._waiters.setdefault(ev.run_id, {})[ev.task_id] = where

    def clear(self) -> None:
        """Forget every waiter."""
        self._waiters = {}

    def match(
        self, jobs: list[Queued], state: State, source: str, now: float
    ) -> tuple[list[Queued], list[Handoff]]:
        """Split ``jobs`` into those left for Celery and the hand-offs, each with the TASK_STARTED event
        that claims the attempt for its worker. Forgets every waiter, matched or not."""
        waiters, self._waiters = self._waiters, {}
        if not self.enabled or not waiters:
            return jobs, []
        rest: list[Queued] = []
        handoffs: list[Handoff] = []
        for job, queue in jobs:
            waiting = waiters.get(job.run_id)
            worker: Waiter | None = None
            if waiting and not job.timeout:
                defs = state.runs[job.run_id].defs
                for dep in defs[job.task_id].dependencies:
                    if dep in waiting and defs[dep].queue == queue:
                        worker = waiting.pop(dep)
                        break
            if worker is None:
                rest.append((job, queue))
                continue
            started = Event(
                EventType.TASK_STARTED,
                job.run_id,
                job.task_id,
                job.attempt,
                {
                    "worker": worker[0],
                    "handoff": True,
                    CLAIM_KEY: worker[2],
                    **({"via": worker[1]} if worker[1] else {}),
                },
                ts=now,
                source=source,
            )
            # The job names its claim: a thread pool's threads share one hand-off list, and the thread
            # that pops the job finds the nonce the waiter keeps for that claim.
            handoffs.append((started, replace(job, claim=worker[2]), queue))
        return rest, handoffs
