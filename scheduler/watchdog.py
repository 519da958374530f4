"""The watchdog: running tasks whose worker died, and tasks past their time limit.

A worker host that dies whole keeps its Celery messages hostage until the broker's visibility timeout
(an hour by default); the watchdog notices the missing heartbeat within seconds and re-dispatches the
task as a new attempt. Time limits are enforced here too, so they hold on thread pools (where Celery
cannot enforce them) and when a hard limit killed the process before it could record anything.

A live process can also lose an attempt: recording its outcome failed (Redis away past the client's
retry budget, after which Celery acks the message) or the outcome was lost with Redis's last second of
writes. Each worker's heartbeat lists the attempts the process holds (``worker.held``); an attempt
RUNNING on a live worker that has not listed it for ``UNHELD_GRACE_S`` is re-dispatched like one whose
worker died. That counts towards the lost-worker (poison) bound: an attempt that keeps vanishing
fails after ``max_redeliveries`` instead of running forever.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass

from nerv_cluster import constants
from nerv_cluster.errors import TaskTimeoutError, WorkerLostError
from nerv_cluster.eventlog import EventLog
from nerv_cluster.failures import failure_outcome
from nerv_cluster.jobs import Job, job_id
from nerv_cluster.model import Event, EventType, TaskError
from nerv_cluster.settings import Settings
from nerv_cluster.state import RunState, State
from scheduler.consumers import Consumers


@dataclass(frozen=True, slots=True)
class Verdict:
    """An attempt the watchdog ends, and the event that records why."""

    run_id: str
    task_id: str
    attempt: int
    event: Event
    #: True when the worker was lost (as opposed to a timeout).
    lost: bool = False


def time_limit(settings: Settings, run: RunState, task_id: str) -> float:
    """The task's own timeout, else its queue's default (0: none)."""
    td = run.defs[task_id]
    if td.timeout:
        return td.timeout
    return queue_time_limit(settings, td.queue)


def queue_time_limit(settings: Settings, queue: str) -> float:
    """The default time limit of a queue's tasks (0: none)."""
    return settings.cpu_timeout if queue == "cpu" else settings.io_timeout


def overdue(run: RunState, settings: Settings, now: float, source: str) -> list[Verdict]:
    """RUNNING tasks of ``run`` past their time limit plus grace: each fails (or retries) with a timeout."""
    out = []
    for tid in run.running:
        ts = run.tasks[tid]
        limit = time_limit(settings, run, tid)
        if not limit or ts.started_at is None or now < ts.started_at + limit + constants.TIMEOUT_GRACE_S:
            continue
        error = TaskError.from_exception(TaskTimeoutError(f"task {tid!r} ran past its {limit}s time limit"))
        kind, data = failure_outcome(run.defs[tid].retry, ts.attempt, error, now, first=ts.first)
        data["worker"] = ts.worker
        out.append(
            Verdict(
                run.run_id,
                tid,
                ts.attempt,
                Event(kind, run.run_id, tid, ts.attempt, data, ts=now, source=source),
            )
        )
    return out


def held_by(beat: str | None) -> frozenset[str] | None:
    """The job ids a heartbeat value says its process holds; None when it says nothing about them (no
    heartbeat, or one from a version that only wrote ``1``)."""
    if not beat or not beat.startswith("{"):
        return None
    try:
        held = json.loads(beat).get("held")
    except (ValueError, AttributeError):
        return None
    return frozenset(str(j) for j in held) if isinstance(held, list) else None


def lost(run: RunState, task_id: str, settings: Settings, now: float, source: str, why: str = "") -> Verdict:
    """The verdict for a task whose worker is gone (or no longer holds the attempt): a new attempt, or
    FAILED once it happened too often."""
    ts = run.tasks[task_id]
    why = why or f"worker {ts.worker} was lost while running attempt {ts.attempt}"
    if not ts.batch and ts.lost + 1 >= settings.max_redeliveries:
        error = TaskError.from_exception(
            WorkerLostError(
                f"{why}; workers were lost {ts.lost + 1} times running this task (a poison task?)"
            )
        )
        ev = Event(
            EventType.TASK_FAILED,
            run.run_id,
            task_id,
            ts.attempt,
            {"error": error.to_dict(), "reason": why},
            ts=now,
            source=source,
        )
    else:
        data: dict[str, object] = {"next_attempt": ts.attempt + 1, "reason": why}
        if ts.batch:
            # Claimed with its whole packed batch: the process may have died in another job of it.
            # Not counted; the next attempt travels alone (``pack``), so a loss then is its own.
            reason = f"{why} (claimed in a packed batch: not counted, the next attempt runs alone)"
            data.update(reason=reason, counted=False)
        ev = Event(EventType.TASK_PENDING, run.run_id, task_id, ts.attempt, data, ts=now, source=source)
    return Verdict(run.run_id, task_id, ts.attempt, ev, lost=True)


class Watchdog:
    """Finds attempts to end; the service supersedes them in Redis, then records the verdicts."""

    def __init__(self, log: EventLog, settings: Settings) -> None:
        self.log = log
        self.settings = settings
        self._missing_since: dict[str, float] = {}
        #: Job id -> when a live worker's heartbeat was first seen not listing that RUNNING attempt.
        self._unheld_since: dict[str, float] = {}
        self._redis_run_id: str | None = None
        self.consumers = Consumers(log)

    def redis_restarted(self) -> bool:
        """True when the Redis server is a new process since the last call (its ``run_id`` changed)."""
        current = str(self.log.redis.info("server").get("run_id", ""))
        changed = self._redis_run_id is not None and current != self._redis_run_id
        self._redis_run_id = current
        return changed

    def lost_consumers(self, state: State, now: float) -> list[tuple[Job, str]]:
        """The queued jobs to resend because the consuming process that had them prefetched died
        (only those of its queues; see :mod:`scheduler.consumers`)."""
        return self.consumers.sweep(state, now)

    def sweep(self, state: State, now: float, source: str) -> list[Verdict]:
        """Every verdict due now across all runs."""
        verdicts: list[Verdict] = []
        by_worker: dict[str, list[tuple[RunState, str]]] = defaultdict(list)
        for run in state.runs.values():
            if not run.running or run.cancel_requested:
                continue
            late = overdue(run, self.settings, now, source)
            verdicts.extend(late)
            late_ids = {v.task_id for v in late}
            for tid in run.running:
                worker = run.tasks[tid].worker
                if tid not in late_ids and worker:
                    by_worker[worker].append((run, tid))
        if not by_worker:
            self._missing_since.clear()
            self._unheld_since.clear()
            return verdicts
        workers = list(by_worker)
        pipe = self.log.redis.pipeline(transaction=False)
        for w in workers:
            pipe.get(self.log.keys.heartbeat(w))
        beats = dict(zip(workers, pipe.execute(), strict=True))
        verdicts.extend(self.judge(by_worker, beats, now, source))
        return verdicts

    def judge(
        self,
        by_worker: Mapping[str, list[tuple[RunState, str]]],
        beats: Mapping[str, str | None],
        now: float,
        source: str,
    ) -> list[Verdict]:
        """The lost-attempt verdicts, given each worker's RUNNING attempts and heartbeat value (None:
        missing). Pure apart from the "missing since" times it keeps: a worker must stay missing for
        ``LOST_WORKER_GRACE_S``, an attempt unlisted by a live worker for ``UNHELD_GRACE_S`` (a beat
        written just before the claim never causes a verdict)."""
        verdicts: list[Verdict] = []
        missing = {w for w in by_worker if beats.get(w) is None}
        self._missing_since = {w: self._missing_since.get(w, now) for w in missing}
        unheld: dict[str, float] = {}
        for w, attempts in by_worker.items():
            if w in missing:
                if now - self._missing_since[w] >= constants.LOST_WORKER_GRACE_S:
                    verdicts.extend(lost(run, tid, self.settings, now, source) for run, tid in attempts)
                continue
            held = held_by(beats.get(w))
            if held is None:
                continue
            for run, tid in attempts:
                attempt = run.tasks[tid].attempt
                jid = job_id(run.run_id, tid, attempt)
                if jid in held:
                    continue
                since = unheld[jid] = self._unheld_since.get(jid, now)
                if now - since >= constants.UNHELD_GRACE_S:
                    why = (
                        f"worker {w} is alive but no longer holds attempt {attempt} "
                        "(its outcome never reached the log)"
                    )
                    verdicts.append(lost(run, tid, self.settings, now, source, why))
        self._unheld_since = unheld
        return verdicts
