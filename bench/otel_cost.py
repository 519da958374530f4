"""``python -m bench.otel_cost``: what OpenTelemetry tracing costs the scheduler (issue 12, part 7).

A fan-out of 2,000 noops, with the scheduler's tracing off and on, in one run:

- **cluster**: our engine (a scheduler and one prefork worker, as in ``python -m bench``); the
  scheduler is restarted between the variants, with tracing off, or on with ``OTEL_EXPORTER_OTLP_ENDPOINT``
  pointing at an OTLP/HTTP receiver in this process (so the export over HTTP is paid for, in the
  scheduler's background thread). The variants alternate ``--repeat`` times; medians of the wall time
  (submit to the client seeing the end) and of the scheduler's CPU seconds (psutil), the figure machine
  noise moves least, and every traced run's 2,001 spans checked received.
- **core**: the scheduler's pure core (fold + decide, workers simulated, no Redis) on the same shape,
  without and with the tracing fed the same events (spans built and handed to the SDK, whose in-memory
  exporter takes them); CPU seconds.

The ratio traced / untraced is the row; the same Redis rules as ``python -m bench`` (database 13, flushed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.__main__ import DEFAULT_DB, with_db
from bench.engines import Stopwatch

N = 2_000
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "otel_cost.json"


def _restart_scheduler(engine: Any, env: dict[str, str]) -> None:
    """Replace the engine's scheduler by one with ``env`` and wait until it leads."""
    cluster = engine.cluster
    old = [s for s in cluster.services if s.name.startswith("scheduler")]
    cluster.stop_services(old)
    cluster.spawn("scheduler", "scheduler", env=env)
    cluster.wait_ready(engine.client, {"bench.noop"})


def cluster_once(engine: Any, n: int, timeout: float) -> tuple[float, float | None, str]:
    """One fan-out run; wall seconds, scheduler CPU seconds, run id."""
    from bench.map_row import _scheduler_cpu
    from bench.nerv_tasks import noop
    from nerv_cluster import Workflow

    client = engine.client
    cpu0 = _scheduler_cpu(engine)
    with Stopwatch() as sw:
        wf = Workflow("fanout-otel")
        for i in range(n):
            wf.add(noop, id=f"n{i}")
        run_id = client.submit(wf)
        res = client.wait(run_id, timeout=timeout)
    res.raise_for_status()
    cpu1 = _scheduler_cpu(engine)
    return sw.seconds, None if cpu0 is None or cpu1 is None else cpu1 - cpu0, run_id


def core_once(n: int, traced: bool, batch: int = 64) -> float:
    """CPU seconds of fold + decide for a whole fan-out run, workers simulated ``batch`` jobs at a time
    (as ``bench.map_row.core_once``), with the tracing fed every event when ``traced``."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from nerv_cluster import Workflow
    from nerv_cluster import state as st
    from nerv_cluster.model import Event, EventType
    from scheduler import otel_export
    from scheduler.decisions import Decisions, decide

    rid = "bench-otel-core"
    wf = Workflow("fanout-otel")
    for i in range(n):
        wf.add("bench.noop", id=f"n{i}")
    sub = Event(EventType.WORKFLOW_SUBMITTED, rid, data={"workflow": wf.definition().to_dict()}, ts=1.0)
    exporter = InMemorySpanExporter()
    tr = otel_export.Tracing(otel_export.provider(exporter, batch=False)) if traced else None
    started = time.process_time()
    state = st.fold([sub])
    if tr is not None:
        tr.observe([sub], state)
    pending: list[Any] = []
    while not state.runs[rid].status.terminal:
        out = Decisions()
        decide(state.runs[rid], 2.0, "scheduler:bench", out)
        state = st.fold(out.events, state)
        if tr is not None:
            tr.observe(out.events, state)
        pending.extend(job for job, _ in out.jobs)
        done, pending = pending[:batch], pending[batch:]
        feed = []
        for job in done:
            for kind, data in ((EventType.TASK_STARTED, {"worker": "w"}), (EventType.TASK_COMPLETED, {})):
                ev = Event(kind, rid, job.task_id, job.attempt, data, ts=2.0)
                state = st.apply(state, ev)
                feed.append(ev)
        if tr is not None:
            tr.observe(feed, state)
    spent = time.process_time() - started
    if tr is not None:
        assert len(exporter.get_finished_spans()) == n + 1, len(exporter.get_finished_spans())
        tr.shutdown()
    return spent


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.otel_cost",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--n", type=int, default=N, help=f"fan-out width (default {N})")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--repeat", type=int, default=3, help="runs per variant; the median is kept (default 3)")
    p.add_argument("--redis-url", default=os.environ.get("NERV_REDIS_URL", "redis://127.0.0.1:6379"))
    p.add_argument("--redis-db", type=int, default=DEFAULT_DB)
    p.add_argument("--core-only", action="store_true", help="only the pure core (no cluster)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = p.parse_args(argv)

    out: dict[str, Any] = {"n": args.n, "repeat": args.repeat}
    core: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(args.repeat):
        for mode in ("off", "on"):
            core[mode].append(core_once(args.n, mode == "on"))
    out["core_cpu_s"] = {m: statistics.median(v) for m, v in core.items()}
    out["core_ratio"] = out["core_cpu_s"]["on"] / out["core_cpu_s"]["off"]
    print(
        f"core (fold + decide, {args.n} tasks): CPU s off {out['core_cpu_s']['off']:.3f}, "
        f"on {out['core_cpu_s']['on']:.3f}: x{out['core_ratio']:.2f}",
        flush=True,
    )

    if not args.core_only:
        from bench.nerv_engine import NervEngine
        from scheduler.tracing import run_span_id
        from tests.integration.otlp import OtlpReceiver

        url = with_db(args.redis_url, None if args.redis_db < 0 else args.redis_db)
        engine = NervEngine()
        wall: dict[str, list[float]] = {"off": [], "on": []}
        cpu: dict[str, list[float]] = {"off": [], "on": []}
        with OtlpReceiver() as rx:
            traced_env = {"OTEL_EXPORTER_OTLP_ENDPOINT": rx.endpoint}
            engine.start(url, args.workers)
            try:
                for i in range(args.repeat):
                    for mode in ("off", "on") if i % 2 == 0 else ("on", "off"):
                        _restart_scheduler(engine, traced_env if mode == "on" else {})
                        seconds, sched_cpu, run_id = cluster_once(engine, args.n, 300)
                        if mode == "on":
                            rx.wait_for(
                                lambda got, r=run_id: any(s.span_id == run_span_id(r) for s in got), 30
                            )
                        wall[mode].append(seconds)
                        if sched_cpu is not None:
                            cpu[mode].append(sched_cpu)
                        print(
                            f"  {mode}: {seconds:.3f}s wall, scheduler CPU {sched_cpu}",
                            file=sys.stderr,
                            flush=True,
                        )
                spans = len(rx.spans)
            finally:
                engine.stop()
        out["cluster_wall_s"] = {m: statistics.median(v) for m, v in wall.items()}
        out["cluster_wall_ratio"] = out["cluster_wall_s"]["on"] / out["cluster_wall_s"]["off"]
        if cpu["off"] and cpu["on"]:
            out["scheduler_cpu_s"] = {m: statistics.median(v) for m, v in cpu.items()}
            out["scheduler_cpu_ratio"] = out["scheduler_cpu_s"]["on"] / out["scheduler_cpu_s"]["off"]
        out["spans_received"] = spans
        w = out["cluster_wall_s"]
        line = (
            f"cluster ({args.n} tasks, medians of {args.repeat}): wall off {w['off']:.3f}s, "
            f"on {w['on']:.3f}s: x{out['cluster_wall_ratio']:.2f}"
        )
        if "scheduler_cpu_ratio" in out:
            c = out["scheduler_cpu_s"]
            line += (
                f"; scheduler CPU s off {c['off']:.3f}, on {c['on']:.3f}: x{out['scheduler_cpu_ratio']:.2f}"
            )
        print(line + f"; {spans} spans received", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
