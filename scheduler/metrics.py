"""Prometheus metrics of the scheduler, served over HTTP (``NERV_METRICS_PORT``, default 9808).

Bound to loopback unless ``NERV_METRICS_HOST`` names another address, and, with ``NERV_METRICS_TOKEN``,
answered only to ``Authorization: Bearer <token>`` (401 otherwise): the metrics name task functions,
queues and tenants, which a neighbour on the network need not learn.

Besides the usual counters it exports the DAG-aware signal no queue-length autoscaler has: how many
tasks will become ready as soon as the tasks now running finish (``nerv_tasks_ready_soon``), per
queue, so workers can be scaled ahead of demand.
"""

from __future__ import annotations

import hmac
import logging
import socket
import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Mapping
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from nerv_cluster import constants
from nerv_cluster.jobs import Job
from nerv_cluster.model import Event, EventType, TaskStatus
from nerv_cluster.state import State

log = logging.getLogger("nerv.scheduler")

_OUTCOME_LABEL = {
    EventType.TASK_COMPLETED: "completed",
    EventType.TASK_FAILED: "failed",
    EventType.TASK_RETRYING: "retrying",
    EventType.TASK_SPAWNED: "spawned",  # returned a child workflow (nerv_cluster/children.py)
}
_RUN_END = {
    EventType.WORKFLOW_COMPLETED: "COMPLETED",
    EventType.WORKFLOW_FAILED: "FAILED",
    EventType.WORKFLOW_CANCELLED: "CANCELLED",
}


class _Server(ThreadingMixIn, WSGIServer):
    """A threaded WSGI server (a slow scraper does not hold the next one up)."""

    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    """No access log line per scrape on stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def with_bearer_token(app: Callable[..., Any], token: str) -> Callable[..., Any]:
    """``app`` answering only requests that carry ``Authorization: Bearer <token>``; 401 otherwise
    (the token compared in constant time). An empty token: ``app`` as it is."""
    if not token:
        return app
    expected = f"Bearer {token}".encode()

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        given = environ.get("HTTP_AUTHORIZATION", "").encode()
        if not hmac.compare_digest(given, expected):
            start_response(
                "401 Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", 'Bearer realm="nerv-metrics"')],
            )
            return [b"a bearer token is required (NERV_METRICS_TOKEN)\n"]
        return app(environ, start_response)

    return guarded


def serve_wsgi(app: Callable[..., Any], host: str, port: int) -> WSGIServer:
    """Serve ``app`` on ``host:port`` from a daemon thread (IPv6 for an IPv6 address)."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]

    class Server(_Server):
        address_family = family

    httpd = make_server(host, port, app, Server, handler_class=_Quiet)
    threading.Thread(target=httpd.serve_forever, name="nerv-metrics", daemon=True).start()
    return httpd


class SchedulerMetrics:
    """The scheduler's metrics, in a registry of their own (several services may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.server: WSGIServer | None = None
        r = self.registry
        self.leader = Gauge("nerv_scheduler_leader", "1 while this replica holds the lease", registry=r)
        self.runs_active = Gauge(
            "nerv_runs_active", "Runs not finished, as this leader sees them", registry=r
        )
        self.runs_finished = Counter("nerv_runs_finished", "Runs finished, by status", ["status"], registry=r)
        self.events = Counter("nerv_events_folded", "Feed events folded into the state", registry=r)
        self.dispatched = Counter("nerv_tasks_dispatched", "Jobs sent to workers", ["queue"], registry=r)
        self.outcomes = Counter(
            "nerv_task_outcomes", "Attempt outcomes recorded by workers", ["queue", "outcome"], registry=r
        )
        self.latency = Histogram(
            "nerv_dispatch_latency_seconds",
            "From the scheduler reading the event that made a task ready to the task's job being sent",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.ready = Gauge("nerv_tasks_ready", "Ready tasks not dispatched yet", ["queue"], registry=r)
        self.running = Gauge("nerv_tasks_running", "Tasks a worker is running", ["queue"], registry=r)
        self.ready_soon = Gauge(
            "nerv_tasks_ready_soon",
            "Pending tasks whose every unfinished dependency is running or queued now: the next wave",
            ["queue"],
            registry=r,
        )
        # Fair share (issue 11, part 3): jobs dispatched (QUEUED) that wait in the scheduler for their
        # run's turn. The Celery queue holds only about a round per worker slot, so its length no longer
        # shows the backlog: an autoscaler scales on queue length plus this.
        self.waiting_turn = Gauge(
            "nerv_jobs_waiting_turn",
            "Dispatched jobs held in the scheduler for their run's fair-share turn (not in the Celery queue)",
            ["queue"],
            registry=r,
        )
        for q in constants.QUEUES:
            for g in (self.dispatched, self.ready, self.running, self.ready_soon, self.waiting_turn):
                g.labels(queue=q)
        # Part "cache" (issue 16): cached tasks completed from an entry (hit) or dispatched (miss).
        self.cache = Counter("nerv_cache_lookups", "Cached tasks decided, by result", ["result"], registry=r)
        for result in ("hit", "miss"):
            self.cache.labels(result=result)

    def serve(self, port: int, addr: str = constants.DEFAULT_METRICS_HOST, token: str = "") -> bool:
        """Serve ``/metrics`` on ``addr:port`` (port 0: don't), behind ``token`` if one is given; False
        when the port is taken (logged, not fatal)."""
        if not port:
            return False
        try:
            self.server = serve_wsgi(with_bearer_token(make_wsgi_app(self.registry), token), addr, port)
        except OSError as exc:
            log.warning("metrics not served: %s:%d: %s", addr, port, exc)
            return False
        log.info("metrics on http://%s:%d/metrics%s", addr, port, " (bearer token required)" if token else "")
        return True

    def on_feed(self, state: State, events: Iterable[Event]) -> None:
        """Count folded feed events and the outcomes among them."""
        n = 0
        for ev in events:
            n += 1
            label = _OUTCOME_LABEL.get(ev.type)
            if label is None or ev.task_id is None:
                continue
            run = state.runs.get(ev.run_id)
            td = run.defs.get(ev.task_id) if run is not None else None
            if td is not None:
                self.outcomes.labels(queue=td.queue, outcome=label).inc()
        self.events.inc(n)

    def on_decided(self, events: Iterable[Event]) -> None:
        """Count finished runs, and cache hits and misses, among the scheduler's own events."""
        for ev in events:
            status = _RUN_END.get(ev.type)
            if status is not None:
                self.runs_finished.labels(status=status).inc()
            elif ev.type is EventType.CACHE_HITS:
                self.cache.labels(result="hit").inc(len(ev.data["hits"]))
            elif ev.type is EventType.TASK_DISPATCHED and "cache_key" in ev.data:
                self.cache.labels(result="miss").inc()

    def on_sent(self, jobs: Iterable[tuple[Job, str]], since: float, now: float) -> None:
        """Count sent jobs and their dispatch latency."""
        per_queue = Tally(queue for _, queue in jobs)
        for queue, n in per_queue.items():
            self.dispatched.labels(queue=queue).inc(n)
            for _ in range(n):
                self.latency.observe(max(0.0, now - since))

    def on_waiting(self, per_queue: Mapping[str, int]) -> None:
        """Set the jobs waiting for their fair-share turn, per queue (from the outbox, each sweep)."""
        for q in {*constants.QUEUES, *per_queue}:
            self.waiting_turn.labels(queue=q).set(per_queue.get(q, 0))

    def refresh(self, state: State, leader: bool) -> None:
        """Recompute the gauges from the state (called from the watchdog's sweep, not per event)."""
        self.leader.set(1 if leader else 0)
        self.runs_active.set(len(state.runs))
        ready: Tally[str] = Tally()
        running: Tally[str] = Tally()
        soon: Tally[str] = Tally()
        for run in state.runs.values():
            for tid in run.ready:
                ready[run.defs[tid].queue] += 1
            active = {*run.running, *run.queued}
            for tid in run.running:
                running[run.defs[tid].queue] += 1
            seen: set[str] = set()
            for tid in active:
                for child in run.plan.dependents[tid]:
                    if child in seen or run.tasks[child].status is not TaskStatus.PENDING:
                        continue
                    seen.add(child)
                    deps = run.defs[child].dependencies
                    if all(run.tasks[d].status is TaskStatus.COMPLETED or d in active for d in deps):
                        soon[run.defs[child].queue] += 1
        for q in constants.QUEUES:
            self.ready.labels(queue=q).set(ready[q])
            self.running.labels(queue=q).set(running[q])
            self.ready_soon.labels(queue=q).set(soon[q])
