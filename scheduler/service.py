"""The scheduler service loop: hold the lease, read the feed, fold, decide, write (fenced), send.

Level-triggered: every decision is recomputed from the folded state, so a new leader that refolds the
run logs picks up exactly where a dead one stopped. The loop owns only the state, the feed cursor and
the set of runs to decide for; each other concern is a room of its own that owns its state:

- :mod:`scheduler.takeover`: becoming leader (refold from checkpoints and logs, jobs to resend);
- :mod:`scheduler.transcribe`: workers' events checked, folded, and transcribed into the run logs in
  the next fenced write (:mod:`nerv_cluster.outcomes`);
- :mod:`scheduler.effects`: every write to Redis (fenced) and every revoke;
- :mod:`scheduler.dispatch`: the outbox of jobs to send, packed, in fair-share turns
  (:mod:`nerv_cluster.fairshare`), with the pack-hold;
- :mod:`scheduler.handoff_match`: waiting workers matched with the dependents they ready;
- :mod:`scheduler.timers`: due times (retry delays);
- :mod:`scheduler.waits`: deadlines of durable waits (``wait_for`` timeouts, sleeps);
- :mod:`scheduler.circuit_watch`: workers' outcomes fed to the circuit breakers;
- :mod:`scheduler.watchdog`: lost workers and tasks past their time limit;
- :mod:`scheduler.caching`: result cache lookups before dispatch, and who computes which key;
- :mod:`scheduler.schedules`: schedules' slots fired, each once (issue 11, idem);
- :mod:`scheduler.intake`: clients' requests read from the intake, checked, applied and answered (issue 13);
- :mod:`scheduler.tracing`: runs as OpenTelemetry traces, from the events folded (issue 12; None when off);
- :mod:`scheduler.checkpointer`, :mod:`scheduler.metrics`, :mod:`scheduler.lease`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any

import redis

from nerv_cluster import constants, outcomes
from nerv_cluster import state as st
from nerv_cluster.cachestore import CacheStore
from nerv_cluster.errors import LeaseLostError, ReplicationError
from nerv_cluster.eventlog import Batch, EventLog
from nerv_cluster.fairshare import Share, share_of
from nerv_cluster.handoff import Handoffs
from nerv_cluster.jobs import Job
from nerv_cluster.limits import Gate
from nerv_cluster.model import Event, EventType
from nerv_cluster.schedulestore import ScheduleStore
from nerv_cluster.settings import Settings
from nerv_cluster.signing import Signer, signing_key
from scheduler import checkpointer, reruns, takeover
from scheduler.caching import CacheRoom, import_modules
from scheduler.child_reruns import ChildReruns
from scheduler.circuit_watch import CircuitWatch
from scheduler.decisions import Decisions, Limits, decide_isolated, settle_cancels
from scheduler.dispatch import Dispatcher, Outbox, unsendable_events
from scheduler.effects import Effects
from scheduler.handoff_match import HandoffMatcher
from scheduler.intake import IntakeRoom
from scheduler.lease import Lease, LeaseKeeper, LoopProgress
from scheduler.limit_watch import LimitWatch
from scheduler.metrics import SchedulerMetrics
from scheduler.schedules import ScheduleRoom
from scheduler.timers import Timers
from scheduler.tracing import from_settings as tracing_from_settings
from scheduler.waits import WaitRoom
from scheduler.watchdog import Watchdog, queue_time_limit

if TYPE_CHECKING:  # the OpenTelemetry SDK is imported only when tracing is on
    from scheduler.otel_export import Tracing

log = logging.getLogger("nerv.scheduler")

#: Feed entries processed between two trims of the feed.
_TRIM_EVERY = 5_000
#: Pause after a Redis error before trying again.
_BACKOFF_S = 0.5


class SchedulerService:
    """One scheduler replica. Call :meth:`run` (blocking) or :meth:`step` (for tests)."""

    def __init__(
        self,
        settings: Settings,
        log: EventLog,
        lease: Lease,
        dispatcher: Dispatcher,
        clock: Callable[[], float] = time.time,
        handoffs: Handoffs | None = None,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.log = log
        self.lease = lease
        self.clock = clock
        self.handoff = handoffs is not None
        #: The bounds runs and jobs are held to (fixed by the settings).
        self.limits = Limits.of(settings)
        self.state = st.EMPTY
        self.cursor = "0-0"
        #: Runs to decide for before the next read.
        self._touched: set[str] = set()
        self.metrics = SchedulerMetrics()
        self.effects = Effects(log, lease, dispatcher, settings.retention_seconds)
        limited = [q for q in constants.QUEUES if queue_time_limit(settings, q)]
        #: Fair share (issue 11, nerv_cluster/fairshare.py): the tenants' weights, and each run tree's
        #: share (by its root run), computed once per tree.
        self.weights = settings.weights()
        self._shares: dict[str, Share] = {}
        self.outbox = Outbox(log, dispatcher, self._sent, limited, settings.fair_jobs_per_slot, self._share)
        self.timers = Timers()
        self.waits = WaitRoom()
        self.matcher = HandoffMatcher(self.handoff)
        self.circuits = CircuitWatch()
        #: Concurrency keys and rate limits (issue 11, nerv_cluster/limits.py).
        self.gate = Gate()
        self.limit_watch = LimitWatch(self.gate)
        self.schedules = ScheduleRoom(ScheduleStore(log.redis, log.keys, log.scripts.replication))
        self.watchdog = Watchdog(log, settings)
        self.child_reruns = ChildReruns(log)
        import_modules(settings.scheduler_modules)  # custom cache key functions
        self.caching = CacheRoom(CacheStore(log.redis, log.keys), self.effects.token, clock)
        #: Clients' requests (issue 13): read with the feed, applied and answered by this room.
        self.intake = IntakeRoom(
            log, settings, self.schedules, self.limit_watch, CacheStore(log.redis, log.keys)
        )
        self._next_prune = 0.0
        #: OpenTelemetry spans of runs and attempts (None when tracing is off: one check per batch).
        self.tracing = tracing if tracing is not None else tracing_from_settings(settings)
        self.checkpointer = checkpointer.Checkpointer(
            log, settings.checkpoint_events, lambda: self.state.runs
        )
        self.leader_since: float | None = None
        self._since_trim = 0
        self._read_at = time.monotonic()
        self._next_sweep = 0.0
        #: When the gauges may be refreshed again (spaced by their cost, see _sweep).
        self._next_gauges = 0.0
        #: Completed steps, for the lease keeper (a loop that only fails is no progress).
        self.progress = LoopProgress()
        #: Set after a Redis error: what we hold may be behind what Redis has, so refold before acting.
        self._stale = False
        #: What every job and hand-off is signed with (the key is read when the first term begins).
        self._signer: Signer | None = None
        self.dispatcher = dispatcher

    @property
    def source(self) -> str:
        """How this scheduler signs its events."""
        return f"scheduler:{self.lease.token}"

    def _fold(self, events: Sequence[Event]) -> None:
        """Fold the scheduler's own events (written to the run logs, never to the feed) into the state,
        and show them to the tracing, which sees the feed's events in :meth:`step`."""
        self.state = st.fold(events, self.state)
        if self.tracing is not None:
            self.tracing.observe(events, self.state)

    def _share(self, job: Job) -> Share | None:
        """The fair-share lane of a job: its run tree's share; None for a task with a concurrency key
        or a rate limit (the gate decided when it starts: metering it again would move its start)."""
        runs = self.state.runs
        run = runs.get(job.run_id)
        if run is not None:
            td = run.defs.get(job.task_id)
            if td is not None and (td.concurrency is not None or td.rate_limit is not None):
                return None
        lane = job.family or job.run_id
        share = self._shares.get(lane)
        if share is None:
            root = runs.get(lane) or run
            meta = root.definition.meta if root is not None else {}
            share = self._shares[lane] = share_of(meta, self.weights)
        return share

    def _queued(self, run_id: str, task_id: str, attempt: int) -> bool:
        """Whether the fold has this attempt dispatched and not started, in a run not being cancelled."""
        run = self.state.runs.get(run_id)
        return (
            run is not None
            and not run.cancel_requested
            and task_id in run.queued
            and run.tasks[task_id].attempt == attempt
        )

    def _still_dispatched(self, job: Job) -> bool:
        """Whether a job waiting in the outbox is still to be sent (see :meth:`_queued`)."""
        return self._queued(job.run_id, job.task_id, job.attempt)

    def _sent(self, jobs: Sequence[tuple[Job, str]]) -> None:
        """Count sent jobs (through Celery or handed over) in the dispatch metrics."""
        self.metrics.on_sent(jobs, self._read_at, time.monotonic())

    # -- leadership -------------------------------------------------------------------------------------

    def become_leader(self) -> None:
        """Rebuild the state of every active run (see :mod:`scheduler.takeover`), then resend in-flight
        jobs."""
        started = time.monotonic()
        self.progress.refold_started()
        try:
            found = takeover.refold(self.log, self.progress.refold_tick)
        finally:
            self.progress.refold_done()
        self.state, self.cursor = found.state, found.cursor
        self._begin_term(found.cursor)
        if found.unreadable:
            log.error(
                "closing %d active runs whose submission cannot be read: %s",
                len(found.unreadable),
                ", ".join(repr(rid) for rid in found.unreadable[:20]),
            )
            self.effects.close(found.unreadable, self.clock())
        self.checkpointer.reset(found.positions)
        self.caching.rebuild(self.state)
        self.circuits.reload(self.log)
        self.limit_watch.reload(self.log)
        self.gate.rebuild(self.state, self.clock())
        self.schedules.reload(self.clock())
        self.intake.reset()  # it holds only the requests no leader answered: read it from its start
        self._touched = set(self.state.runs.keys())
        self.timers.clear()
        self.waits.rebuild(self.state)
        if self.tracing is not None:
            self.tracing.rebuild(self.state)
        self.matcher.clear()
        self.outbox.clear()
        self._shares.clear()
        self.child_reruns.clear()
        resend = takeover.in_flight_jobs(self.state)
        self.outbox.add(resend)
        self.leader_since = time.time()
        self._stale = False
        log.info(
            "leader (token %s): refolded %d events of %d active runs (%d from a checkpoint) in %.3fs; "
            "%d jobs to resend",
            self.lease.token,
            found.events,
            len(self.state.runs),
            found.from_checkpoints,
            time.monotonic() - started,
            len(resend),
        )

    def _begin_term(self, position: str) -> None:
        """Seal jobs for this term (signed, with claim tokens under the cluster's claim secret) and
        check workers' events from feed entry ``position`` on (see :mod:`scheduler.transcribe`)."""
        redis_, keys = self.log.redis, self.log.keys
        if self._signer is None:
            self._signer = Signer(signing_key(self.settings.signing_key, redis_, keys))
        signer = self._signer
        tokens = outcomes.AttemptTokens(outcomes.claim_secret(redis_, keys.claim_secret))
        mint = tokens.mint

        def seal(job: Job) -> str:
            return job.to_wire(signer, mint(job.run_id, job.task_id, job.attempt))

        self.effects.seal = seal
        self.dispatcher.seal = seal

        def alive(worker: str) -> bool:
            # Asked only for a takeover (a TASK_STARTED of an attempt another process runs): rare.
            return bool(redis_.exists(keys.heartbeat(worker)))

        self.effects.transcriber.begin(tokens, position, alive)
        if self.log.transcribed_position() is None:
            # No leader recorded a feed position yet (the refold read from the feed's tail): record this
            # one now. A leader that died after reading workers' events and before its first write
            # would leave the next one nothing but the tail, past every event it had read.
            self.effects.transcriber.written = ""
            self.effects.flush_transcripts(force=True)

    def _fold_feed(self, entries: Batch, taken: Collection[str]) -> Batch:
        """Fold the feed's entries that pass :meth:`scheduler.transcribe.Transcriber.admit` (workers'
        events checked, the valid ones queued for transcription); the entries admitted, which the
        rest of the step observes (a dropped one is seen by no one)."""
        admit = self.effects.transcriber.admit
        state = self.state
        admitted = Batch()
        admitted.upto = entries.upto
        for entry_id, ev in entries:
            if not admit(entry_id, ev, entries, state):
                continue
            admitted.append((entry_id, ev))
            # A run taken back holds the batch's events in its log, but not the workers' (not logged yet).
            if not taken or ev.run_id not in taken or ev.type in outcomes.WORKER_TYPES:
                state = st.apply(state, ev)
        self.state = state
        if entries.upto:
            self.effects.transcriber.read_upto(entries.upto)
        return admitted

    def resend_in_flight(self, why: str) -> None:
        """Send every dispatched-but-not-started job again.

        Used when Redis restarted under workers that had reserved some (a dead worker's prefetched
        jobs are resent per queue: :meth:`scheduler.watchdog.Watchdog.lost_consumers`). Copies are
        harmless: a worker claims an attempt once and drops copies at once.
        """
        jobs = takeover.in_flight_jobs(self.state)
        if jobs:
            log.warning("resending %d in-flight jobs: %s", len(jobs), why)
            self.outbox.add(jobs)

    def step_down(self, why: str) -> None:
        """Stop acting as leader; keep nothing, the next leader refolds."""
        log.warning("stepping down: %s", why)
        self.lease.drop()
        self.state = st.EMPTY
        self._touched.clear()
        self.outbox.clear()
        self._shares.clear()
        self.matcher.clear()
        self.timers.clear()
        self.waits.clear()
        self.schedules.clear()
        self.caching.clear()
        self.gate.clear()
        self.child_reruns.clear()
        self.checkpointer.reset({})
        self.effects.transcriber.clear()
        self.effects.seal = self.dispatcher.seal = None
        self.intake.reset()
        if self.tracing is not None:
            self.tracing.clear()
        self.leader_since = None

    # -- one iteration --------------------------------------------------------------------------------

    def step(self) -> int:
        """Read one batch from the feed (waiting briefly if idle), fold it, act. Returns events read."""
        self._flush()
        now = self.clock()
        block = self.settings.block_ms
        dues = (
            self.timers.next_due(),
            self.waits.next_due(),
            self.schedules.next_due(),
            self.gate.next_due(now),
        )
        due = min((d for d in dues if d is not None), default=None)
        if due is not None:
            block = max(1, min(block, int((due - now) * 1000)))
        if self.outbox:  # jobs held back for packing: come back for them soon
            block = max(1, min(block, int(constants.PACK_HOLD_S * 1000)))
        read = self.log.read_feed(
            self.cursor, self.settings.batch_size, None if self._touched else block, self.intake.cursor
        )
        # Runs a rerun reopened come back from their logs, which hold this batch's events of them.
        self.state, taken = reruns.take_back(self.log, self.state, (ev for _, ev in read))
        if taken:
            self.checkpointer.track(taken)
        entries = self._fold_feed(read, taken)  # the workers' events checked (scheduler.transcribe)
        state = self.state
        for _, ev in entries:
            self._touched.add(ev.run_id)
            self.matcher.observe(ev)
        self.cursor = read.upto or self.cursor  # past entries skipped as malformed or dropped too
        if self.tracing is not None and entries:  # workers' and clients' events; ours: _fold
            self.tracing.observe((ev for _, ev in entries), state)
        self._touched |= self.child_reruns.retries()
        self._touched |= self.caching.observe((ev for _, ev in entries), state)
        self.gate.observe((ev for _, ev in entries), state)
        self.outbox.observe(ev for _, ev in entries)
        self.limit_watch.observe(self.log, entries)
        # A TASK_WAITING of an earlier leader that the takeover's refold did not cover comes this way.
        self.waits.observe((ev for _, ev in entries), state)
        if read.intake:
            # The workers' events folded above go into their logs first: a request's events (a
            # cancel, a rerun) must come after them in the log as they did in the fold.
            self.effects.flush_transcripts()
            self._take_requests(read.intake)
        self._read_at = time.monotonic()
        if entries:
            self.metrics.on_feed(state, (ev for _, ev in entries))
        self.effects.record_circuits(self.circuits.observe(entries, self.state, self.source))
        now = self.clock()
        self._touched |= self.timers.release(now)
        self._expire_waits(now)
        self.schedules.observe((ev for _, ev in entries), now)
        fired = self.schedules.act(now, self.state, self.effects.token, self.source)
        if fired:  # the fires' runs, created by the scheduler itself: folded here, like child runs
            self._fold(fired)
            self._touched.update(ev.run_id for ev in fired)
        if now >= self._next_sweep:
            self._next_sweep = now + constants.WATCHDOG_INTERVAL_S
            self._sweep(now)
        self.act()
        self._since_trim += len(read)
        trim = self._since_trim >= _TRIM_EVERY
        # Workers' events no decision followed this step are logged now, not held to the next one.
        self.effects.flush_transcripts(force=trim)
        if trim:  # never past what is transcribed: a new leader reads the feed from there
            self.log.trim_feed(self.effects.transcriber.written)
            self._since_trim = 0
        self.progress.step_done()
        return len(read)

    def _take_requests(self, raw: Sequence[tuple[str, Any]]) -> None:
        """Apply the clients' requests read from the intake with the feed (see :mod:`scheduler.intake`):
        each written (fenced) and answered there, its events folded into the state as it goes, and
        their runs decided for in this step."""
        taken = self.intake.take(raw, self.state, self.effects.token, self.clock())
        self.state = taken.state
        if taken.positions:
            self.checkpointer.track(taken.positions)
        events = taken.events
        if events:
            if self.tracing is not None:
                self.tracing.observe(events, self.state)
            self.metrics.on_feed(self.state, events)
            self._touched.update(ev.run_id for ev in events)

    def _expire_waits(self, now: float) -> None:
        """End the durable waits whose deadline passed (see :mod:`scheduler.waits`), fenced."""
        events = self.waits.expired(now, self.state, self.source)
        if events:
            self.effects.write(events)
            self._fold(events)
            self.metrics.on_decided(events)
            self._touched.update(ev.run_id for ev in events)
            self._touched |= self.caching.observe(events, self.state)

    def _sweep(self, now: float) -> None:
        """The periodic look around: metrics, capacity, the watchdog's verdicts."""
        if now >= self._next_gauges:
            began = time.perf_counter()
            self.metrics.refresh(self.state, leader=True)
            # The gauges walk every ready and active task: on a run of 100,000 that took a sixth of
            # the loop at one refresh per sweep. Spaced by their own cost, they take at most
            # 1 / GAUGES_COST_FACTOR of it, however big the runs are.
            spent = time.perf_counter() - began
            self._next_gauges = now + max(constants.WATCHDOG_INTERVAL_S, constants.GAUGES_COST_FACTOR * spent)
        self.metrics.on_waiting(self.outbox.waiting_turn())
        self.outbox.capacity = self.log.capacity()
        if now >= self._next_prune:  # clients only read the registry: the leader drops stale names
            self._next_prune = now + constants.REGISTRY_PRUNE_S
            self.log.registered_tasks(prune=True)
        self.outbox.reconcile(self._queued)
        verdicts = self.watchdog.sweep(self.state, now, self.source)
        events = self.effects.end_attempts(verdicts)
        if events:
            self._fold(events)
            self._touched.update(ev.run_id for ev in events)
            self._touched |= self.caching.observe(events, self.state)
            self.gate.observe(events, self.state)
            self.outbox.observe(events)
        if self.watchdog.redis_restarted():
            self.resend_in_flight("Redis restarted")
        else:  # a dead consumer's prefetched jobs wait for the visibility timeout: resend its queues'
            self.outbox.add(self.watchdog.lost_consumers(self.state, now))

    def act(self) -> None:
        """Decide for every touched run until nothing more follows; write, fold back, dispatch."""
        self._release_held()
        while self._touched:
            touched, self._touched = self._touched, set()
            try:
                self._act_on(touched)
            except BaseException:
                self._touched |= touched
                raise
            self._release_held()
        self.caching.flush()  # results folded in the last round (a child run's output, say)

    def _release_held(self) -> None:
        """Held tasks whose key has a free slot again, or whose rate limit a free start, go to be
        decided for (see :meth:`nerv_cluster.limits.Gate.release`)."""
        gate = self.gate
        if not (gate.by_key or gate.by_rate):
            return
        now = self.clock()
        due = gate.next_due(now)
        if gate.pending() or (due is not None and due <= now):
            self._touched |= gate.release(now, self.state)

    def _act_on(self, touched: set[str]) -> None:
        """Decide for ``touched`` runs; write the events (fenced), fold them back, then send the jobs."""
        out = Decisions()
        now = self.clock()
        breakers = self.circuits.breakers
        limits = self.limits
        cache = self.caching.prepare(touched, self.state)
        runs = self.state.runs
        for rid in touched:
            run = runs.get(rid)
            if run is not None:
                decide_isolated(
                    run,
                    now,
                    self.source,
                    out,
                    breakers,
                    self.handoff,
                    limits,
                    cache=cache,
                    runs=runs,
                    gate=self.gate,
                )
        if out.cancels:  # the outcome slots first: an attempt a worker finished meanwhile keeps its outcome
            settle_cancels(out, self.effects.take_slots(out.cancelled_attempts(), EventType.TASK_CANCELLED))
        jobs, handoffs = self.matcher.match(out.jobs, self.state, self.source, now)
        if out.events or handoffs:
            handed = self.effects.write(out.events, [(started, job) for started, job, _ in handoffs])
            taken = []
            claims = []
            for (started, job, queue), ok in zip(handoffs, handed, strict=True):
                if ok:
                    taken.append((job, queue))
                    claims.append(started)
                else:  # the worker stopped waiting: the normal way, then
                    jobs.append((job, queue))
            events = out.events + claims if claims else out.events
            if taken:  # sent, as far as the metrics go: counted like the jobs that go through Celery
                self._sent(taken)
            self._fold(events)
            self.metrics.on_decided(events)
            self.waits.observe(events, self.state)
            self._touched.update(ev.run_id for ev in events)
            self._touched |= self.child_reruns.ended(events)
            self._touched |= self.caching.observe(events, self.state)
            self.gate.observe(events, self.state)
            self.outbox.observe(events)
        if cache is not None:
            self._touched |= cache.missing
        if out.spawns or out.child_reruns:  # their cause (a worker's event) is logged first
            self.effects.flush_transcripts()
        if out.spawns:  # after the events they follow: a crash between leaves them to be decided again
            spawned = self.effects.spawn(out.spawns, self.state, now)
            self._fold(spawned)
            self._touched.update(ev.run_id for ev in spawned)
            self.gate.observe(spawned, self.state)
        if out.child_reruns:  # a rerun of their parents: after the events, as spawns (see the room)
            recorded = self.child_reruns.act(
                out.child_reruns, self.state, self.effects.token(), now, self.source
            )
            if recorded:
                self.effects.write(recorded)
                self._fold(recorded)
                self._touched.update(ev.run_id for ev in recorded)
                self.gate.observe(recorded, self.state)
        if out.revoke:
            self.effects.cancel_jobs(out.revoke, self.state)
        self.timers.add(out.delayed)
        self.outbox.add(jobs)
        self._flush()
        self._close(out.finished)

    def _flush(self) -> None:
        """Send the outbox; the tasks of messages the broker refused (not a lost connection: it
        answered no) fail with the reason, and the other jobs went out."""
        refused = self.outbox.flush(self._still_dispatched)
        if refused:
            failed = unsendable_events(refused, self.clock(), self.source)
            self.effects.write(failed)
            self._fold(failed)
            self._touched.update(ev.run_id for ev in failed)
            self._touched |= self.caching.observe(failed, self.state)
            self.gate.observe(failed, self.state)

    def _close(self, run_ids: list[str]) -> None:
        """Finished runs: let their keys expire and forget them (memory stays bounded by active runs)."""
        if not run_ids:
            return
        state = self.state
        self.effects.close(
            run_ids, self.clock(), {rid: r.reruns for rid in run_ids if (r := state.runs.get(rid))}
        )
        for rid in run_ids:
            run = state.runs.get(rid)
            if run is not None:
                log.info("run %r %s (%d tasks)", rid, run.status.value, run.total)
                self.gate.forget((run,))
            state = st.evict(state, rid)
            self.checkpointer.forget(rid)
        self.state = state
        self.outbox.forget(run_ids)
        for rid in run_ids:
            self._shares.pop(rid, None)
        self._touched |= self.caching.forget(run_ids)
        self.schedules.run_ended(run_ids, self.clock())
        if self.tracing is not None:
            self.tracing.forget(run_ids)

    # -- the loop -------------------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> None:
        """Serve until ``stop`` is set: stand by until the lease is free, then lead."""
        stop = stop or threading.Event()
        standby_wait = self.lease.ttl_ms / 1000 / 5
        log.info("scheduler started; waiting for the lease")
        self.metrics.serve(
            self.settings.metrics_port, self.settings.metrics_host, self.settings.metrics_token
        )
        keeper = LeaseKeeper(self.lease, self.progress.stalled_for, self.settings.loop_stall_s)
        keeper.start()
        self.checkpointer.start()
        try:
            while not stop.is_set():
                try:
                    if not self.lease.held:
                        if self.leader_since is not None:
                            self.step_down("lease expired before it was renewed")
                        if not self.lease.acquire():
                            self.metrics.refresh(st.EMPTY, leader=False)
                            stop.wait(standby_wait)
                            continue
                        self.progress.acquired()
                        self.become_leader()
                    elif self._stale:
                        if not keeper.renew():
                            self.step_down("lease lost, or let lapse, while the loop could not go on")
                            continue
                        self.become_leader()
                    self.step()
                except LeaseLostError as exc:
                    self.step_down(str(exc))
                except ReplicationError as exc:
                    # A decision no replica holds may be gone after a failover, or this Redis is a cut-off
                    # old primary: lead only from writes that are sure to last (issue 17).
                    self.step_down(str(exc))
                    stop.wait(_BACKOFF_S)
                except redis.RedisError as exc:
                    log.warning("redis error: %s; will refold and retry", exc)
                    self._stale = True
                    stop.wait(_BACKOFF_S)
                except Exception:
                    # A bug must not take the scheduler down: log it, drop what we hold, refold.
                    log.exception("unexpected error in the scheduler loop; refolding")
                    self._stale = True
                    stop.wait(_BACKOFF_S)
        finally:
            keeper.stop()
            self.checkpointer.stop()
            if self.tracing is not None:
                self.tracing.shutdown()
            try:
                self.lease.release()
            except redis.RedisError:
                log.debug("could not release the lease; it will expire")
            log.info("scheduler stopped")
