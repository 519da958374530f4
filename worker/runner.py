"""Running one job: claim the attempt, call the registered function, record exactly one outcome.

The outcome is TASK_COMPLETED (with the JSON result), TASK_RETRYING (the policy allows another
attempt; the scheduler owns the delay), TASK_FAILED (with the error's type, message and traceback) or,
when the function returned a ``Workflow``, TASK_SPAWNED (its definition: the scheduler runs it as a
child run and completes the task with its output, see ``nerv_cluster.children``; this process goes on
at once).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import traceback
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from nerv_cluster import constants
from nerv_cluster.children import SpawnBounds, spawned_data
from nerv_cluster.errors import (
    JobSignatureError,
    MalformedJobError,
    NotRegisteredError,
    PayloadTooLargeError,
    SerializationError,
    TaskTimeoutError,
    WorkerLostError,
)
from nerv_cluster.eventlog import EventLog
from nerv_cluster.failures import failure_outcome
from nerv_cluster.handoff import Handoffs
from nerv_cluster.jobs import Job, job_id
from nerv_cluster.model import Event, EventType, TaskError
from nerv_cluster.outcomes import claim_of, new_nonce
from nerv_cluster.registry import Registry, TaskContext
from nerv_cluster.signing import Signer, WorkerSigner, claimed_id
from nerv_cluster.workflow import Workflow
from worker.held import HeldAttempts

log = logging.getLogger("nerv.worker")

#: Longest a batch holds finished outcomes before recording them (downstream tasks wait for them).
BATCH_FLUSH_S = 0.02
#: Hand-off claims a process keeps the nonces of (one per waiting thread is needed; old ones go).
MAX_WAITS = 1024
#: Attempts a process keeps its claims' nonces of (about 100 bytes each): the ones it runs, and recent
#: ones it may be sent again.
MAX_NONCES = 10_000
#: Verdicts of a batch claim whose job this process runs.
_RUN = frozenset({"ok", "strict"})


def new_worker_id() -> str:
    """A unique id for this process: host, pid, and a random part (a restarted pid is a new worker)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class TaskRunner:
    """Runs jobs in one worker process."""

    def __init__(
        self,
        log: EventLog,
        registry: Registry,
        worker_id: str,
        max_result_bytes: int,
        max_redeliveries: int,
        handoffs: Handoffs | None = None,
        held: HeldAttempts | None = None,
        stopping: Callable[[], bool] | None = None,
        spawn_bounds: SpawnBounds | None = None,
        signing: str = "",
    ) -> None:
        self.log = log
        #: ``NERV_SIGNING_KEY`` ('' for the per-cluster key in Redis), read into ``signer`` once.
        self._signing = signing
        self._signer: WorkerSigner | None = None
        #: What a returned workflow is checked against before it is recorded.
        self.spawn_bounds = spawn_bounds or SpawnBounds()
        self.handoffs = handoffs
        self.registry = registry
        self.worker_id = worker_id
        self.max_result_bytes = max_result_bytes
        self.max_redeliveries = max_redeliveries
        #: The attempts this process holds (the heartbeat publishes them).
        self.held = held if held is not None else HeldAttempts()
        #: True once the worker began a warm shutdown: serve no more hand-offs.
        self.stopping = stopping or (lambda: False)
        #: Job id -> the nonce of this process's claim on that attempt; never written anywhere. Kept
        #: after the outcome (bounded, oldest out): a process that claims an attempt again (the job
        #: resent after its outcome could not be recorded) names the same claim, which the scheduler
        #: folded already, so its outcome is taken (a second start of one worker is a copy there).
        self._nonces: OrderedDict[str, str] = OrderedDict()
        #: Claim -> nonce of the hand-offs this process's outcomes asked for: shared by a thread pool's
        #: threads, which share one hand-off list (the thread that pops a job may not be the one whose
        #: outcome asked for it). Bounded, oldest out: a wait lasts ``HANDOFF_WAIT_S``.
        self._waits: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def signer(self) -> Signer:
        """What job messages are checked with (the key is read once per process)."""
        if self._signer is None:
            self._signer = WorkerSigner(self._signing, self.log.redis, self.log.keys)
        return self._signer.get()

    def open(self, wires: Sequence[object]) -> list[Job]:
        """The jobs of signed job messages; a message that is not signed by the scheduler, or was
        altered, is refused: logged (its id, never its arguments), not run, nothing recorded for it."""
        jobs = []
        signer = self.signer
        for wire in wires:
            try:
                jobs.append(Job.from_wire(wire, signer))
            except JobSignatureError as exc:
                log.warning("refused job %s: %s; not run", claimed_id(wire), exc)
            except (MalformedJobError, KeyError, TypeError, ValueError, RecursionError) as exc:
                log.warning("refused job %s: a signed message that is no job (%s)", claimed_id(wire), exc)
        return jobs

    def _event(self, kind: EventType, job: Job, data: dict[str, Any]) -> Event:
        # The claim token (and an outcome's nonce) ride in the data to EventLog, which moves them out of
        # the logged event. A start makes the attempt's nonce and names only its hash: the nonce stays
        # in this process until the outcome presents it (nerv_cluster/outcomes.py).
        data[constants.TOKEN_KEY] = job.token
        if kind is EventType.TASK_STARTED:
            data[constants.CLAIM_KEY] = claim_of(self._nonce(job.id))
        else:
            data[constants.NONCE_KEY] = self._nonces.get(job.id, "")
        return Event(kind, job.run_id, job.task_id, job.attempt, data, source=f"worker:{self.worker_id}")

    def _nonce(self, jid: str) -> str:
        """The nonce of this process's claim on attempt ``jid``: made at its first claim here."""
        with self._lock:
            nonce = self._nonces.get(jid)
            if nonce is None:
                nonce = new_nonce()
                _keep(self._nonces, jid, nonce, MAX_NONCES)
            return nonce

    def claim(
        self, jobs: Sequence[Job], via: str = "", outcomes: Sequence[Event] = (), batch: bool = False
    ) -> list[Job]:
        """Record TASK_STARTED for the attempts that did not run yet and are not running elsewhere; return
        the jobs to run (one round trip, which first records ``outcomes``, the finished jobs before).

        A copy of an attempt this very process holds already (a redelivery or a resend reaching a thread
        pool, whose threads share one worker id) is dropped before Redis is asked. A copy of a job whose
        attempt another live process holds is dropped at once: if that process dies, the scheduler's
        watchdog sees its heartbeat go and dispatches a new attempt. A copy that finds the holder
        already dead takes over; when that happened too often, the attempt fails instead of killing
        another process. The jobs returned are held (``self.held``) until their outcome is recorded.

        With ``batch`` the jobs are a packed batch, claimed together before any of them runs (see
        :meth:`claim_batch`); a job whose previous holder died is then left out, to be claimed alone.
        """
        return [job for job, verdict in self._claim(jobs, via, outcomes, batch) if verdict == "ok"]

    def claim_batch(self, jobs: Sequence[Job], via: str = "") -> list[tuple[Job, bool]]:
        """Claim a packed batch in one round trip, before running any of it: the jobs to run, each with
        whether it is claimed already (False: claim it alone, right before it runs, since a process
        holding it died; a loss then is counted against it, while a loss of a batch-claimed job is not,
        as the process may have died in another job of the batch).

        This keeps a batch at about two round trips in all; claiming each job as it starts would make
        it one per job (measured: a 2,000-task fan-out ran at half the rate).
        """
        claimed = self._claim(jobs, via, (), True)
        return [(job, verdict == "ok") for job, verdict in claimed if verdict in _RUN]

    def _claim(
        self, jobs: Sequence[Job], via: str, outcomes: Sequence[Event], batch: bool
    ) -> list[tuple[Job, str]]:
        """Claim ``jobs`` (after recording ``outcomes``); each job this process may run, with its
        verdict (``ok``, or with ``batch`` also ``strict``: not claimed, to be claimed alone)."""
        mine = []
        for job in jobs:
            if self.held.acquire(job.id):
                mine.append(job)
            else:
                log.info("job %s not run: this process runs the attempt already", job.id)
        if not mine and not outcomes:
            return []
        started = [self._event(EventType.TASK_STARTED, job, self._where(job, via, batch)) for job in mine]
        try:
            verdicts = self.log.start_attempts(
                started, self.worker_id, self.max_redeliveries, outcomes, batch=batch
            )
        except BaseException:
            self.held.release(job.id for job in mine)
            raise
        runnable: list[tuple[Job, str]] = []
        poisoned, dropped = [], []
        for job, verdict in zip(mine, verdicts, strict=True):
            if verdict == "ok":
                runnable.append((job, verdict))
                continue
            dropped.append(job.id)  # a 'strict' one is held again by its own claim
            if verdict == "strict":
                runnable.append((job, verdict))
                continue
            if verdict == "poison":
                lost = WorkerLostError(
                    f"the worker process running task {job.task_id!r} died {self.max_redeliveries} times "
                    "before it could finish (a poison task?); not running it again"
                )
                poisoned.append(self._failure(job, TaskError.from_exception(lost), time.time()))
            else:
                why = "already has an outcome" if verdict == "done" else "is held by a live worker"
                log.info("job %s not run: the attempt %s", job.id, why)
        self.held.release(dropped)
        self.log.finish_attempts(poisoned)
        return runnable

    def fail(self, jobs: Sequence[Job], error: TaskError) -> None:
        """Claim ``jobs`` and record each one FAILED with ``error``, without running it (a function this
        worker does not have). Claimed first like any attempt: only the claim's holder records its outcome."""
        claimed = self.claim(jobs)
        data = {"error": error.to_dict(), "worker": self.worker_id}
        try:
            self.log.finish_attempts([self._event(EventType.TASK_FAILED, job, dict(data)) for job in claimed])
        finally:
            self.held.release(job.id for job in claimed)

    def serve(
        self, jobs: Sequence[Job], on_handed: Callable[[Job, Event], None] | None = None, via: str = ""
    ) -> int:
        """Run the jobs of one message, then the jobs handed to this process directly, one after the
        other, while each one's success readies the next (a chain). Returns the number of jobs run.

        Waiting happens only after a message of one job the scheduler marked (``Job.handoff``) whose
        success was recorded: then a dependent on this queue is ready and coming. ``on_handed`` is
        called with each handed job and its outcome, once the outcome is recorded. ``via``: the id of
        the Celery message being served, which the attempts record (cancelling a run revokes it).
        Once the worker began a warm shutdown (``stopping``), it waits for no more hand-offs: the
        scheduler sends the rest of the chain through Celery, to another worker.
        """
        batch, claimed, ran = list(jobs), False, 0
        while batch:
            waits = self.handoffs is not None and len(batch) == 1 and batch[0].handoff and not self.stopping()
            outcomes, waiting = self._run(batch, claimed, waits, via)
            ran += len(outcomes)
            if claimed and on_handed is not None:
                for job, outcome in zip(batch, outcomes, strict=True):
                    on_handed(job, outcome)
            if not waiting:
                return ran
            assert self.handoffs is not None
            handed = self.handoffs.take(self.worker_id, constants.HANDOFF_WAIT_S)
            # A handed job is claimed for this process already (fenced_append.lua), with the claim the
            # outcome before it named: its outcome presents that nonce.
            if handed is not None:
                self.held.add(handed.id)
                with self._lock:
                    _keep(self._nonces, handed.id, self._waits.pop(handed.claim, ""), MAX_NONCES)
            batch, claimed = ([handed], True) if handed is not None else ([], False)
        return ran

    def run(self, job: Job) -> EventType | None:
        """Run one job; returns the outcome recorded, or None when the job was a duplicate."""
        outcomes = self.run_batch([job])
        return outcomes[0] if outcomes else None

    def run_batch(self, jobs: Sequence[Job]) -> list[EventType]:
        """Run jobs one after the other (a batch the scheduler packed into one message).

        The batch is claimed as a whole first (:meth:`claim_batch`), and outcomes are recorded together
        but never held back longer than ``BATCH_FLUSH_S``: downstream tasks wait for them.
        """
        return [ev.type for ev in self._run(jobs, claimed=False, wait=False)[0]]

    def _where(self, job: Job, via: str, batch: bool = False) -> dict[str, Any]:
        """Who runs an attempt, and in which Celery message when that is not the job's own (a packed
        batch's later jobs, handed jobs): cancelling the run must revoke that message. ``batch``: the
        attempt is claimed with its whole batch (a loss of its worker is then not counted against it)."""
        where: dict[str, Any] = {"worker": self.worker_id}
        if via and via != job.id:
            where["via"] = via
        if batch:
            where["batch"] = True
        return where

    def _run(self, jobs: Sequence[Job], claimed: bool, wait: bool, via: str = "") -> tuple[list[Event], bool]:
        """Claim (unless ``claimed``) and run ``jobs``: a lone job as it starts, a packed batch as a whole
        first (:meth:`claim_batch`); with ``wait``, a COMPLETED last outcome says this process waits for
        a hand-off. Returns the outcomes and whether the process now waits.

        Every attempt run here is held until its outcome is recorded; when recording fails (Redis away
        past the retry budget) it is given up all the same: the process no longer holds it, and the
        scheduler's watchdog, missing it from the heartbeat, dispatches a new attempt.
        """
        pending: list[Event] = []  # outcomes not recorded yet (their attempts still held)
        outcomes: list[Event] = []
        if claimed:
            plan = [(job, True) for job in jobs]
        elif len(jobs) > 1:
            plan = self.claim_batch(jobs, via)
        else:
            plan = [(job, False) for job in jobs]
        #: What this call holds and has not given up: released at the end whatever happens, so an
        #: attempt never stays held (and so never re-dispatched) after its job stopped here.
        mine = {job.id for job, ready in plan if ready}
        flushed = time.monotonic()
        try:
            for i, (job, ready) in enumerate(plan):
                if not ready:
                    runnable = self.claim([job], via, pending)
                    done = _ids(pending)  # recorded by the claim's round trip
                    self.held.release(done)
                    mine.difference_update(done)
                    pending, flushed = [], time.monotonic()
                    if not runnable:
                        continue
                    mine.add(job.id)
                outcome = self.execute(job, wait, via)
                outcomes.append(outcome)
                pending.append(outcome)
                # Downstream tasks wait for these: never hold them back longer than BATCH_FLUSH_S. The
                # last outcome goes below, with the waiting flag when the process waits for a hand-off.
                if i < len(plan) - 1 and time.monotonic() - flushed >= BATCH_FLUSH_S:
                    self.log.finish_attempts(pending)
                    done = _ids(pending)
                    self.held.release(done)
                    mine.difference_update(done)
                    pending, flushed = [], time.monotonic()
            waits = (
                bool(pending)
                and pending[-1].type is EventType.TASK_COMPLETED
                and "handoff" in pending[-1].data
            )
            recorded = self.log.finish_attempts(pending, self.worker_id if waits else "")
            return outcomes, waits and bool(recorded) and recorded[-1]
        finally:
            self.held.release(mine)

    def execute(self, job: Job, waiting: bool = False, via: str = "") -> Event:
        """Call the job's function; the outcome event (COMPLETED, RETRYING or FAILED), not yet recorded.

        ``waiting`` marks a COMPLETED outcome with this worker id as the place to hand the next job to.
        """
        started = time.time()
        tf = self.registry.get(job.fn)
        try:
            if tf is None:
                raise NotRegisteredError(f"task {job.fn!r} is not registered on worker {self.worker_id}")
            args = job.args
            if tf.context:
                ctx = TaskContext(
                    run_id=job.run_id,
                    task_id=job.task_id,
                    attempt=job.attempt,
                    results=job.context or {},
                    worker=self.worker_id,
                    workflow=job.workflow,
                )
                args = [ctx, *args]
            value = tf.fn(*args, **job.kwargs)
            if isinstance(value, Workflow):  # a child run: the scheduler runs it, this slot is free
                data = spawned_data(value, self.spawn_bounds)
                data.update(worker=self.worker_id, started_at=started)
                return self._event(EventType.TASK_SPAWNED, job, data)
            self._check_result(job, value)
        except SoftTimeLimitExceeded:
            exc = TaskTimeoutError(f"task {job.task_id!r} ran past its {job.timeout}s time limit")
            return self._failure(job, TaskError.from_exception(exc, traceback.format_exc()), started)
        except Exception as exc:
            return self._failure(job, TaskError.from_exception(exc, traceback.format_exc()), started)
        data = {"result": value, "worker": self.worker_id, "started_at": started}
        # Asked again now, not only when the job started: a warm shutdown that began while it ran (the
        # usual case: `docker stop` mid-task) must not take the next job of the chain into this process.
        if waiting and not self.stopping():
            data["handoff"] = self.worker_id
            # The claim of the job to be handed: the scheduler's TASK_STARTED for it names this.
            nonce = new_nonce()
            claim = data[constants.HANDOFF_CLAIM_KEY] = claim_of(nonce)
            with self._lock:
                _keep(self._waits, claim, nonce, MAX_WAITS)
            if via:  # the message a job handed to this process runs in
                data["via"] = via
        return self._event(EventType.TASK_COMPLETED, job, data)

    def _check_result(self, job: Job, value: Any) -> None:
        try:
            size = len(json.dumps(value, separators=(",", ":"), allow_nan=False))
        except (TypeError, ValueError) as exc:
            raise SerializationError(
                f"task {job.task_id!r} returned a value that is not JSON: {exc}"
            ) from None
        if size > self.max_result_bytes:
            raise PayloadTooLargeError(
                f"task {job.task_id!r} returned {size} bytes of JSON; the limit is {self.max_result_bytes}"
            )

    def _failure(self, job: Job, error: TaskError, started: float) -> Event:
        kind, data = failure_outcome(job.retry, job.attempt, error, time.time(), first=job.first)
        data.update(worker=self.worker_id, started_at=started)
        log.info("job %s %s: %s", job.id, kind.value, error)
        return self._event(kind, job, data)


def _keep(kept: OrderedDict[str, str], key: str, value: str, bound: int) -> None:
    """``kept[key] = value``, the oldest entries dropped beyond ``bound``."""
    kept[key] = value
    while len(kept) > bound:
        kept.popitem(last=False)


def _ids(events: Sequence[Event]) -> list[str]:
    """The job ids of attempts' events."""
    return [job_id(ev.run_id, str(ev.task_id), int(ev.attempt or 0)) for ev in events]
