"""Writing the scheduler's decisions: fenced events, outcome slots, revokes, closing runs.

Every write here goes through the lease token (``nerv_cluster/lua/*`` check it inside Redis), so a
scheduler that lost the lease writes nothing: :class:`~nerv_cluster.errors.LeaseLostError` instead.

Invariant: an attempt the scheduler ends itself (its worker was lost, it ran past its time limit, its
run was cancelled) has its outcome slot taken *before* the event that ends it is written; a worker that
finishes the same attempt at the same moment either got the slot first (its outcome stands, the verdict
is dropped) or records nothing.

And every run-log write here carries first the workers' events read since the last one
(:mod:`scheduler.transcribe`), so they are logged before the decisions that follow from them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

from nerv_cluster import children
from nerv_cluster.children import Spawn
from nerv_cluster.errors import LeaseLostError
from nerv_cluster.eventlog import EventLog
from nerv_cluster.jobs import Job
from nerv_cluster.model import Event, EventType
from nerv_cluster.state import State
from scheduler.dispatch import Dispatcher
from scheduler.lease import Lease
from scheduler.transcribe import Transcriber
from scheduler.watchdog import Verdict

log = logging.getLogger("nerv.scheduler")


class Effects:
    """The scheduler's writes to Redis and its revokes to the workers."""

    def __init__(
        self, eventlog: EventLog, lease: Lease, dispatcher: Dispatcher, retention_seconds: int
    ) -> None:
        self.log = eventlog
        self.lease = lease
        self.dispatcher = dispatcher
        self.retention_seconds = retention_seconds
        #: The workers' events waiting to be transcribed (every log write carries them first).
        self.transcriber = Transcriber()
        #: Seals a job into its signed message with its attempt's claim token (set for each term).
        self.seal: Callable[[Job], str] | None = None

    def _append(self, events: Sequence[Event], handoffs: Sequence[tuple[Event, str]] = ()) -> list[bool]:
        """One fenced write: the pending transcripts and the feed position they cover, then ``events``
        and ``handoffs`` (see ``EventLog.append_fenced``)."""
        transcripts, position = self.transcriber.take()
        handed = self.log.append_fenced(events, self.token(), handoffs, transcripts, position)
        self.transcriber.wrote(position)
        return handed

    def flush_transcripts(self, force: bool = False) -> None:
        """Write the pending transcripts now (no decision followed them this step); with ``force``,
        also just the feed position when it moved (before trimming the feed up to it)."""
        if self.transcriber.pending or (force and self.transcriber.position != self.transcriber.written):
            self._append([])

    def token(self) -> str:
        """Our fencing token; the keeper thread may have dropped it a moment ago."""
        token = self.lease.token
        if token is None:
            raise LeaseLostError("the lease was lost while acting")
        return token

    def write(self, events: Sequence[Event], handoffs: Sequence[tuple[Event, Job]] = ()) -> list[bool]:
        """Append decisions (fenced) and, in the same atomic step, hand jobs to waiting workers: per
        hand-off, whether it was handed (see ``EventLog.append_fenced``)."""
        seal = self.seal
        if handoffs and seal is None:
            raise LeaseLostError("no term: jobs cannot be sealed")
        return self._append(events, [(started, seal(job)) for started, job in handoffs] if seal else [])

    def record_circuits(self, transitions: Sequence[Event]) -> None:
        """Write circuit transitions (to their runs and the circuits stream) and keep that stream short."""
        if transitions:
            self._append(transitions)
            self.log.trim_circuits()

    def end_attempts(self, verdicts: Sequence[Verdict]) -> list[Event]:
        """Supersede the attempts first, then record the verdicts we won; returns those events."""
        if not verdicts:
            return []
        token = self.token()
        won = self.log.supersede([(v.run_id, v.task_id, v.attempt) for v in verdicts], token, "SUPERSEDED")
        events = [v.event for v, ok in zip(verdicts, won, strict=True) if ok]
        for ev in events:
            log.warning(
                "%s %s/%s attempt %s: %s",
                ev.type.value,
                ev.run_id,
                ev.task_id,
                ev.attempt,
                ev.data.get("reason") or ev.data.get("error", {}).get("message"),
            )
        if events:
            self._append(events)
        return events

    def spawn(self, spawns: Sequence[Spawn], state: State, now: float) -> list[Event]:
        """Create child runs (each once, with CHILD_STARTED in its parent's log); the events to fold:
        each created child's submission and CHILD_STARTED, or a TASK_FAILED for a spawn whose child
        run id another run holds (written here)."""
        if not spawns:
            return []
        verdicts = self.log.spawn_children(spawns, self.token())
        events: list[Event] = []
        failed: list[Event] = []
        for sp, verdict in zip(spawns, verdicts, strict=True):
            if verdict == "taken":
                run = state.runs.get(sp.parent.run_id)
                if run is not None:
                    failed.append(children.taken(sp, run, now, sp.started.source))
                continue
            events += [sp.submitted, sp.started]
        if failed:
            self._append(failed)
        return events + failed

    def take_slots(self, attempts: Sequence[tuple[str, str, int]], why: EventType) -> list[str]:
        """Take the outcome slots of these (run, task, attempt) where free; what holds each afterwards
        (``why`` where the scheduler has it, else the outcome a worker recorded first)."""
        return self.log.slot_holders(attempts, self.token(), why)

    def cancel_jobs(self, job_ids: Sequence[str], state: State) -> None:
        """Revoke the Celery messages cancelled attempts run in: their own, and the one carrying them
        when packed or handed over. Their outcome slots were taken before the cancel was recorded
        (:meth:`take_slots`), so a worker that picks one up later skips it."""
        attempts = []
        for jid in job_ids:
            rid, tid, attempt = jid.rsplit(":", 2)
            attempts.append((rid, tid, int(attempt)))
        carriers = []
        cancelled_runs = {rid for rid, _, _ in attempts}
        for rid, tid, _ in attempts:
            run = state.runs.get(rid)
            via = run.tasks[tid].via if run is not None and tid in run.tasks else None
            # A message of a tree of child runs may carry jobs of other runs of the tree: revoking it
            # would drop those. A cancelled job in it is skipped when its turn comes (its slot is
            # taken), or runs to its end with its outcome dropped.
            if via and via.rsplit(":", 2)[0] in cancelled_runs:
                carriers.append(via)
        self.dispatcher.revoke(list(dict.fromkeys([*job_ids, *carriers])))

    def close(self, run_ids: Sequence[str], now: float, reruns: Mapping[str, int] | None = None) -> None:
        """Finished runs: drop them from the active set and let their keys expire after the retention
        (the all-runs index forgets runs submitted more than the retention before ``now``). ``reruns``:
        the rerun number folded per run; a run a later rerun reopened stays open (``close.lua``)."""
        self.log.close_runs(run_ids, self.retention_seconds, now, reruns)
