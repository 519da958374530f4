"""OpenTelemetry traces of runs, built by the scheduler from the events it folds (issue 12, part 7).

Each run is a trace, each attempt of a task a span (a child of its run's span), with the attributes
``nerv.queue``, ``nerv.worker``, ``nerv.attempt`` and ``nerv.status`` and links to the spans of the
dependencies' attempts that fed it. A child run's span is a child of the attempt that returned it, in
its root run's trace.

Invariants:

- **From the log, by the scheduler.** Spans are made from the events the scheduler folds: the feed's
  (workers', clients') and its own (which go to the run logs only), so a trace is whole even when a
  worker died mid-task: the attempt it lost ends with the watchdog's TASK_PENDING (status ``LOST``)
  and its retry is a span of its own. Times are the events': the log's clock for what was read from
  it, the scheduler's (Redis's) for its own events.
- **Deterministic ids.** The trace id is a hash of the root run's id, a run span's id a hash of the run
  id and its rerun number, an attempt span's id a hash of (run, task, attempt); times are those of the
  events. A new leader (a restart, a failover) rebuilds the open attempts from the refolded state
  (:meth:`SpanBuilder.rebuild`) and emits the same ids and times the old one would have.
- **One span per attempt.** An attempt's span is emitted when its end event is read, once: the
  builder keeps at most one open attempt per task (the current one); an end event of any other attempt
  (late, duplicate) emits nothing.
- **Bounded and cheap.** The builder holds the open attempts and runs of the active runs only (a run's
  records go with its end); the scheduler calls it once per feed batch and per batch of its own
  events, only when tracing is on (``SchedulerService.tracing`` is None otherwise: a None check per
  batch is all it costs).

:class:`SpanBuilder` is pure (events and the folded state in, :class:`SpanRecord` out, no I/O, no
OpenTelemetry); :class:`scheduler.otel_export.Tracing` hands its records to an OpenTelemetry SDK
``TracerProvider`` (an OTLP exporter in production, the SDK's in-memory exporter in tests), which exports
them in the background; :func:`from_settings` makes one when tracing is on, and only then imports the SDK.
What it cannot cover: attempts that ended while no scheduler led (between a leader's death and the next
takeover, about a lease TTL) get no span, and spans a dying scheduler had not exported yet are lost.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nerv_cluster import caching, constants
from nerv_cluster.errors import ConfigurationError
from nerv_cluster.model import Event, EventType, TaskStatus
from nerv_cluster.settings import Settings
from nerv_cluster.state import RunState, State, event_time

if TYPE_CHECKING:
    from scheduler.otel_export import Tracing

log = logging.getLogger("nerv.scheduler")

Attributes = Mapping[str, str | int | float | bool]

#: nerv.status of an attempt span, by the event that ended it.
_END_STATUS = {
    EventType.TASK_COMPLETED: "COMPLETED",
    EventType.TASK_FAILED: "FAILED",
    EventType.TASK_RETRYING: "RETRYING",  # it failed; the policy gave the task another attempt
    EventType.TASK_PENDING: "LOST",  # its worker was lost (or it was superseded): a new attempt follows
    EventType.TASK_CANCELLED: "CANCELLED",
}
_RUN_END = {
    EventType.WORKFLOW_COMPLETED: "COMPLETED",
    EventType.WORKFLOW_FAILED: "FAILED",
    EventType.WORKFLOW_CANCELLED: "CANCELLED",
}
#: Statuses of a dependency whose attempt has a span a dependent can link to.
_LINKABLE = frozenset({TaskStatus.COMPLETED, TaskStatus.FAILED})


def _hash(size: int, *parts: object) -> int:
    """A non-zero id of ``size`` bytes from ``parts`` (zero is OpenTelemetry's invalid id)."""
    raw = "\x1f".join(str(p) for p in parts).encode("utf-8", "surrogatepass")
    value = int.from_bytes(hashlib.blake2b(raw, digest_size=size, person=b"nerv-otel").digest(), "big")
    return value or 1


def trace_id_of(root_run_id: str) -> int:
    """The trace id of a run tree (128 bits), from its root run's id."""
    return _hash(16, "trace", root_run_id)


def run_span_id(run_id: str, rerun: int = 0) -> int:
    """The span id (64 bits) of a run's span; each rerun of a finished run is a span of its own."""
    return _hash(8, "run", run_id, rerun)


def attempt_span_id(run_id: str, task_id: str, attempt: int) -> int:
    """The span id (64 bits) of one attempt of a task."""
    return _hash(8, "attempt", run_id, task_id, attempt)


@dataclass(frozen=True, slots=True)
class SpanRecord:
    """One finished span, as plain data: what :class:`Tracing` hands to OpenTelemetry.

    Times are seconds since the epoch; ``links`` are span ids in the same trace; ``ok`` is the span
    status (True: OK, False: ERROR with ``error``, None: unset).
    """

    name: str
    trace_id: int
    span_id: int
    parent_id: int | None
    start: float
    end: float
    attributes: Attributes
    links: tuple[int, ...] = ()
    ok: bool | None = None
    error: str = ""


@dataclass(slots=True)
class _Attempt:
    """An attempt begun and not ended yet."""

    attempt: int
    queue: str
    fn: str
    dispatched: float
    started: float | None = None
    worker: str = ""
    links: tuple[int, ...] = ()
    child: str = ""


@dataclass(slots=True)
class _Run:
    """A run whose span is open, and its open attempts by task id."""

    trace_id: int
    span_id: int
    parent_id: int | None
    name: str
    start: float
    rerun: int
    open: dict[str, _Attempt] = field(default_factory=dict)


def _links(run: RunState, tid: str) -> tuple[int, ...]:
    """The span ids of the attempts of ``tid``'s dependencies that ended with a span."""
    td = run.defs.get(tid)
    if td is None or not td.dependencies:
        return ()
    tasks = run.tasks
    out = []
    for dep in td.dependencies:
        ds = tasks.get(dep)
        if ds is not None and ds.status in _LINKABLE:
            out.append(attempt_span_id(run.run_id, dep, ds.attempt))
    return tuple(out)


class SpanBuilder:
    """Feed events (and the state folded from them) in, finished spans out. Pure: no I/O."""

    def __init__(self) -> None:
        self.runs: dict[str, _Run] = {}

    def clear(self) -> None:
        """Forget everything (stepping down: the next leader rebuilds)."""
        self.runs.clear()

    def forget(self, run_ids: Iterable[str]) -> None:
        """Drop the records of runs the scheduler forgets (closed): their end event was seen before,
        so this only bounds what a run closed without one would leave."""
        for rid in run_ids:
            self.runs.pop(rid, None)

    def rebuild(self, state: State) -> None:
        """Open the runs and attempts the refolded ``state`` holds, with the ids and times they were
        opened with (a new leader then ends them as the old one would have)."""
        self.runs.clear()
        for run in state.runs.values():
            rec = self._run(run, run.submitted_at)
            for tid, ts in run.tasks.items():
                if (
                    ts.status is TaskStatus.RUNNING
                    or ts.status is TaskStatus.WAITING
                    or (ts.status is TaskStatus.READY and ts.dispatched)
                ):
                    td = run.defs[tid]
                    rec.open[tid] = _Attempt(
                        ts.attempt,
                        td.queue,
                        td.fn,
                        ts.dispatched_at if ts.dispatched_at is not None else (ts.started_at or 0.0),
                        ts.started_at,
                        ts.worker or "",
                        _links(run, tid),
                        ts.child or "",
                    )
            if run.reruns and rec.open:
                # The state keeps no time of the rerun request: the rerun's span starts with its
                # earliest open attempt (the one inexact time after a failover).
                rec.start = min(a.dispatched for a in rec.open.values())

    def _run(self, run: RunState, start: float) -> _Run:
        """The open record of ``run`` (made now, starting at ``start``, if there is none)."""
        rec = self.runs.get(run.run_id)
        if rec is None or rec.rerun != run.reruns:
            parent = run.definition.parent
            rec = _Run(
                trace_id=trace_id_of(run.definition.root or run.run_id),
                span_id=run_span_id(run.run_id, run.reruns),
                parent_id=None
                if parent is None
                else attempt_span_id(parent.run_id, parent.task_id, parent.attempt),
                name=run.name,
                start=start,
                rerun=run.reruns,
            )
            self.runs[run.run_id] = rec
        return rec

    def observe(self, events: Iterable[Event], state: State) -> list[SpanRecord]:
        """The spans these events end. ``state`` is the fold after them (a run's definition, its
        tasks' queues and their dependencies' attempts are read from it)."""
        out: list[SpanRecord] = []
        runs = state.runs
        # A CACHE_HITS is each hit's completion: one span of no length per hit.
        for ev in (one for logged in events for one in caching.expand(logged)):
            kind = ev.type
            tid = ev.task_id
            if tid is None:
                if kind is EventType.WORKFLOW_SUBMITTED or kind is EventType.WORKFLOW_RERUN_REQUESTED:
                    run = runs.get(ev.run_id)
                    if run is not None:
                        self._run(run, ev.ts if kind is EventType.WORKFLOW_SUBMITTED else event_time(ev))
                elif kind in _RUN_END:
                    self._end_run(ev, out)
                continue
            rec = self.runs.get(ev.run_id)
            if rec is None:
                run = runs.get(ev.run_id)
                if run is None:
                    continue
                rec = self._run(run, run.submitted_at)
            status = _END_STATUS.get(kind)
            if status is not None:
                self._end_attempt(rec, ev, tid, status, runs.get(ev.run_id), out)
            elif kind is EventType.TASK_STARTED:
                cur = rec.open.get(tid)
                if cur is None or cur.attempt != ev.attempt:
                    cur = self._open(rec, ev, tid, runs.get(ev.run_id), ev.ts)
                if cur is not None and cur.attempt == ev.attempt:
                    at = event_time(ev)
                    if cur.started is None or at > cur.started:  # a takeover by another process
                        cur.started = at
                        cur.worker = str(ev.data.get("worker", cur.worker))
            elif kind in (EventType.TASK_DISPATCHED, EventType.TASK_WAITING, EventType.MAP_EXPANDED):
                cur = rec.open.get(tid)
                if cur is None or cur.attempt != ev.attempt:
                    self._open(rec, ev, tid, runs.get(ev.run_id), ev.ts)
            elif kind is EventType.CHILD_STARTED or kind is EventType.TASK_SPAWNED:
                cur = rec.open.get(tid)
                if cur is None or cur.attempt != ev.attempt:
                    cur = self._open(rec, ev, tid, runs.get(ev.run_id), ev.ts)
                if cur is not None and kind is EventType.CHILD_STARTED:
                    cur.child = str(ev.data.get("child", ""))
        return out

    @staticmethod
    def _open(rec: _Run, ev: Event, tid: str, run: RunState | None, at: float) -> _Attempt | None:
        """Open attempt ``ev.attempt`` of ``tid`` (it replaces an older one that never ended)."""
        if run is None or ev.attempt is None:
            return None
        td = run.defs.get(tid)
        if td is None:
            return None
        cur = _Attempt(ev.attempt, td.queue, td.fn, at, links=_links(run, tid))
        rec.open[tid] = cur
        return cur

    def _end_attempt(
        self, rec: _Run, ev: Event, tid: str, status: str, run: RunState | None, out: list[SpanRecord]
    ) -> None:
        cur = rec.open.get(tid)
        end = event_time(ev)
        data = ev.data
        if cur is None or (ev.attempt is not None and cur.attempt != ev.attempt):
            # No open attempt: only a completion the scheduler made without a worker (a cache hit)
            # has a span of its own then, of no length; anything else is a late or repeated event.
            if not (ev.type is EventType.TASK_COMPLETED and data.get("cached") is True):
                return
            cur = self._open(rec, ev, tid, run, end)
            if cur is None:
                return
        del rec.open[tid]
        start = cur.started if cur.started is not None else cur.dispatched
        attrs: dict[str, str | int | float | bool] = {
            "nerv.run_id": ev.run_id,
            "nerv.task_id": tid,
            "nerv.queue": cur.queue,
            "nerv.worker": str(data.get("worker", cur.worker) or ""),
            "nerv.attempt": cur.attempt,
            "nerv.status": status,
        }
        if cur.started is not None:
            attrs["nerv.queued_s"] = round(max(0.0, cur.started - cur.dispatched), 6)
        if cur.child:
            attrs["nerv.child_run"] = cur.child
        if data.get("cached") is True:
            attrs["nerv.cached"] = True
        reason = data.get("reason")
        if reason:
            attrs["nerv.reason"] = str(reason)
        error = ""
        err = data.get("error")
        if isinstance(err, Mapping):
            error = f"{err.get('type', 'Error')}: {err.get('message', '')}"
            attrs["nerv.error"] = error
        elif status == "LOST":
            error = str(reason or "the attempt lost its worker")
        ok = True if status == "COMPLETED" else (None if status == "CANCELLED" else False)
        out.append(_attempt_span(rec, ev.run_id, tid, cur, min(start, end), end, attrs, ok, error))

    def _end_run(self, ev: Event, out: list[SpanRecord]) -> None:
        rec = self.runs.pop(ev.run_id, None)
        if rec is None:
            return
        status = _RUN_END[ev.type]
        end = event_time(ev)
        # Attempts still open when their run ended (no end event of their own): closed with it.
        left = "CANCELLED" if status == "CANCELLED" else "UNFINISHED"
        for tid, cur in rec.open.items():
            attempt_attrs: Attributes = {
                "nerv.run_id": ev.run_id,
                "nerv.task_id": tid,
                "nerv.queue": cur.queue,
                "nerv.worker": cur.worker,
                "nerv.attempt": cur.attempt,
                "nerv.status": left,
            }
            begun = cur.started if cur.started is not None else cur.dispatched
            out.append(_attempt_span(rec, ev.run_id, tid, cur, min(begun, end), end, attempt_attrs))
        attrs: dict[str, str | int | float | bool] = {
            "nerv.run_id": ev.run_id,
            "nerv.workflow": rec.name,
            "nerv.status": status,
            "nerv.rerun": rec.rerun,
        }
        reason = ev.data.get("reason")
        if reason:
            attrs["nerv.reason"] = str(reason)
        out.append(
            SpanRecord(
                name=f"run {rec.name}",
                trace_id=rec.trace_id,
                span_id=rec.span_id,
                parent_id=rec.parent_id,
                start=min(rec.start, end),
                end=end,
                attributes=attrs,
                ok=True if status == "COMPLETED" else (None if status == "CANCELLED" else False),
                error=str(reason or "") if status == "FAILED" else "",
            )
        )


# -- switching it on ---------------------------------------------------------------------------------------


def enabled(settings: Settings, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the scheduler traces: ``NERV_OTEL=1``, or an OTLP endpoint in the standard variables."""
    env = os.environ if environ is None else environ
    return settings.otel or any(env.get(name) for name in constants.OTEL_ENDPOINT_VARS)


def from_settings(settings: Settings, environ: Mapping[str, str] | None = None) -> Tracing | None:
    """The scheduler's tracing when it is on (see :func:`enabled`), exporting over OTLP/HTTP to the
    endpoint of the standard ``OTEL_EXPORTER_OTLP_*`` variables; None when off."""
    if not enabled(settings, environ):
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    except ImportError:
        raise ConfigurationError(
            "tracing is on (NERV_OTEL or OTEL_EXPORTER_OTLP_ENDPOINT) but the OTLP exporter is not "
            "installed: pip install 'nerv-cluster[otel]'"
        ) from None
    # The SDK only now: a scheduler that does not trace does not even import it.
    from scheduler.otel_export import Tracing, provider

    log.info("tracing: runs are exported as OpenTelemetry traces over OTLP/HTTP")
    return Tracing(provider(OTLPSpanExporter()))


def _attempt_span(
    rec: _Run,
    run_id: str,
    tid: str,
    cur: _Attempt,
    start: float,
    end: float,
    attrs: Attributes,
    ok: bool | None = None,
    error: str = "",
) -> SpanRecord:
    """The span of attempt ``cur`` of ``tid``, a child of its run's span."""
    return SpanRecord(
        name=cur.fn,
        trace_id=rec.trace_id,
        span_id=attempt_span_id(run_id, tid, cur.attempt),
        parent_id=rec.span_id,
        start=start,
        end=end,
        attributes=attrs,
        links=cur.links,
        ok=ok,
        error=error,
    )
