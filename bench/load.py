"""``python -m bench.load``: latency under an open-loop load of small runs (issue 14, goal 3).

Each run is a chain of 3 noops. Runs are submitted on a fixed schedule (run ``i`` at ``t0 + i /
rate``), whether or not earlier ones finished: an open loop, as a service's users submit. Several
submitting threads (``--threads``) keep the schedule when one submit takes longer than the gap; the
achieved submit rate is reported beside the target.

Per run the latency is submit -> WORKFLOW_COMPLETED:

- ours: from the moment ``Client.submit`` was called (the client's clock, put on Redis's by an offset
  measured with ``TIME`` at start, best of several round trips) to the id of the run's
  WORKFLOW_COMPLETED entry (Redis's clock, millisecond resolution);
- Celery canvas (the peer, ``chain(noop.si(), noop.si(), noop.si())`` per run, the same open loop):
  from ``apply_async`` (the client's clock) to the chain's last result's ``date_done`` (the worker's
  clock: the same host).

The end is found by reading each unfinished run's last log entries (Celery: its result key) every
``--poll`` seconds, pipelined; that look's timing does not enter the latency, which is the logged time.
``from schedule`` is the same latency counted from the run's scheduled time instead (a submit that
lagged behind its schedule counts its lag too: no coordinated omission).

``--ramp`` finds the most runs per second sustained with p99 under ``--p99-ms`` (1 s): steps of
``--step-seconds`` at ``--ramp-start`` runs/s, then times ``--ramp-factor``, until a step fails
(``ramp_verdict``: its p99 over the bound, a backlog of more than a second's worth of runs when the
step's submits end or runs unfinished after ``--drain`` seconds, or a generator that could not offer
the load: then the figure is the bench's limit, and says so).
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.latency import percentile

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "load.json"
OK, P99, BACKLOG, GENERATOR = "ok", "p99", "backlog", "generator"
#: A step whose generator offered less than this share of its target rate measured the bench.
GENERATOR_SHARE = 0.9


def _log(msg: str) -> None:
    print(f"[load] {msg}", file=sys.stderr, flush=True)


def ramp_verdict(
    rate: float, achieved: float, p99_ms: float, backlog: int, unfinished: int, p99_limit_ms: float = 1000.0
) -> str:
    """Whether a ramp step at ``rate`` runs/s was sustained: "ok", or why not.

    "generator": the submits reached less than ``GENERATOR_SHARE`` of the rate (the bench's limit,
    not the cluster's); "backlog": runs unfinished after the drain, or more runs in flight when the
    step's submits ended than ``p99_limit`` worth of the rate (by Little's law a cluster keeping its
    latency under the limit holds fewer); "p99": the latency's p99 over the limit."""
    if achieved < GENERATOR_SHARE * rate:
        return GENERATOR
    if unfinished or backlog > rate * p99_limit_ms / 1000:
        return BACKLOG
    if p99_ms > p99_limit_ms:
        return P99
    return OK


def ramp_rates(start: float, factor: float, most: float) -> list[float]:
    """The ramp's rates: ``start``, then times ``factor`` (rounded to whole runs/s), up to ``most``."""
    if start <= 0 or factor <= 1:
        raise ValueError("the ramp needs a positive start and a factor above 1")
    out, rate = [], start
    while rate <= most:
        out.append(rate)
        rate = float(max(round(rate * factor), rate + 1))
    return out


@dataclass
class Step:
    """One open-loop period at one rate: what was offered and how the runs ended."""

    engine: str
    rate: float
    seconds: float
    submitted: int = 0
    completed: int = 0
    unfinished: int = 0
    failed: int = 0
    achieved_rate: float = 0.0
    submit_lag_p99_ms: float = float("nan")
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    max_ms: float = float("nan")
    sched_p50_ms: float = float("nan")
    sched_p99_ms: float = float("nan")
    backlog: int = 0
    verdict: str = ""
    clock: str = ""


class Target:
    """An engine under load: ``submit()`` one 3-task chain, ``ends(keys)`` of the finished ones."""

    name = ""
    clock = ""

    def start(self, redis_url: str, workers: int) -> None: ...
    def stop(self) -> None: ...
    def submit(self) -> str: ...

    def ends(self, keys: list[str]) -> dict[str, tuple[float, bool]]:
        """For each finished run: (its end on the clock of ``to_end_clock``, True if it completed)."""
        raise NotImplementedError

    def to_end_clock(self, local: float) -> float:
        """A ``time.time()`` of this process on the clock ``ends`` reports."""
        return local


class Ours(Target):
    name = "nerv"
    clock = "submit: client clock + offset to Redis TIME; end: the WORKFLOW_COMPLETED entry id"

    def __init__(self) -> None:
        from bench.nerv_engine import NervEngine

        self.engine = NervEngine()
        self.offset = 0.0
        self.workflow: Any = None

    def start(self, redis_url: str, workers: int) -> None:
        from bench.nerv_tasks import noop
        from nerv_cluster import Workflow

        self.engine.start(redis_url, workers)
        self.client = self.engine.client
        self.offset = clock_offset(self.client.redis)
        wf = Workflow("load")
        a = wf.add(noop, id="a")
        b = wf.add(noop, id="b", dependencies=[a])
        wf.add(noop, id="c", dependencies=[b])
        self.workflow = wf

    def stop(self) -> None:
        self.engine.stop()

    def submit(self) -> str:
        return str(self.client.submit(self.workflow))

    def to_end_clock(self, local: float) -> float:
        return local + self.offset

    def ends(self, keys: list[str]) -> dict[str, tuple[float, bool]]:
        from nerv_cluster import constants
        from nerv_cluster.eventlog import logged_at
        from nerv_cluster.model import WORKFLOW_END_EVENTS, Event, EventType

        pipe = self.client.redis.pipeline(transaction=False)
        for run_id in keys:
            pipe.xrevrange(self.client.keys.log(run_id), count=3)
        out: dict[str, tuple[float, bool]] = {}
        for run_id, entries in zip(keys, pipe.execute(), strict=True):
            for eid, fields in entries:
                try:
                    ev = Event.parse(fields[constants.EVENT_FIELD])
                except Exception:
                    continue
                if ev.type in WORKFLOW_END_EVENTS:
                    out[run_id] = (logged_at(eid), ev.type is EventType.WORKFLOW_COMPLETED)
                    break
        return out


class CeleryCanvas(Target):
    name = "celery-canvas"
    clock = "submit: client clock; end: the chain's last result's date_done (the worker's clock, same host)"

    def start(self, redis_url: str, workers: int) -> None:
        from bench.celery_engines import CeleryCanvasEngine

        self.engine = CeleryCanvasEngine()
        self.engine.start(redis_url, workers)
        from bench import celery_peer

        self.peer = celery_peer
        self.redis = self.engine.redis

    def stop(self) -> None:
        self.engine.stop()

    def submit(self) -> str:
        from celery import chain

        noop = self.peer.noop
        res = chain(noop.si(), noop.si(), noop.si()).apply_async(queue=self.peer.CANVAS_QUEUE)
        return str(res.id)

    def ends(self, keys: list[str]) -> dict[str, tuple[float, bool]]:
        backend = self.peer.app.backend
        assert self.redis is not None
        raws = self.redis.mget([backend.get_key_for_task(k) for k in keys]) if keys else []
        out: dict[str, tuple[float, bool]] = {}
        for key, raw in zip(keys, raws, strict=True):
            if raw is None:
                continue
            meta = json.loads(raw)
            if meta.get("status") not in ("SUCCESS", "FAILURE"):
                continue
            done = dt.datetime.fromisoformat(meta["date_done"])
            if done.tzinfo is None:
                done = done.replace(tzinfo=dt.UTC)
            out[key] = (done.timestamp(), meta["status"] == "SUCCESS")
        return out


TARGETS: dict[str, Callable[[], Target]] = {"nerv": Ours, "celery-canvas": CeleryCanvas}


def clock_offset(redis: Any, tries: int = 20) -> float:
    """Redis's clock minus this process's, from the ``TIME`` call with the shortest round trip."""
    best = (float("inf"), 0.0)
    for _ in range(tries):
        before = time.time()
        secs, micros = redis.time()
        after = time.time()
        best = min(best, (after - before, int(secs) + int(micros) / 1e6 - (before + after) / 2))
    return best[1]


def open_loop(target: Target, rate: float, seconds: float, threads: int, poll: float, drain: float) -> Step:
    """Submit ``rate`` runs/s for ``seconds`` on schedule; wait up to ``drain`` s for the rest."""
    n = max(1, round(rate * seconds))
    step = Step(target.name, rate, seconds, clock=target.clock)
    lock = threading.Lock()
    pending: dict[str, tuple[float, float]] = {}  # key -> (scheduled, submitted), local clock
    done: list[tuple[float, float, float, bool]] = []  # scheduled, submitted, end (end clock), ok
    lags: list[float] = []
    errors: list[str] = []
    counter = itertools.count()
    t0 = time.time() + 0.5
    generating = threading.Event()
    generating.set()
    finished = threading.Event()

    def submitter() -> None:
        while True:
            i = next(counter)
            if i >= n:
                return
            at = t0 + i / rate
            delay = at - time.time()
            if delay > 0:
                time.sleep(delay)
            start = time.time()
            try:
                key = target.submit()
            except Exception as exc:  # counted, never fatal: an open loop keeps its schedule
                errors.append(repr(exc))
                continue
            with lock:
                pending[key] = (at, start)
                lags.append(start - at)

    def collector() -> None:
        while not finished.is_set():
            with lock:
                keys = list(pending)
            if keys:
                try:
                    ends = target.ends(keys)
                except Exception as exc:
                    errors.append(repr(exc))
                    ends = {}
                with lock:
                    for key, (end, ok) in ends.items():
                        at, start = pending.pop(key)
                        done.append((at, start, end, ok))
            if not generating.is_set() and not keys:
                return
            time.sleep(poll)

    subs = [threading.Thread(target=submitter, daemon=True) for _ in range(threads)]
    coll = threading.Thread(target=collector, daemon=True)
    coll.start()
    for s in subs:
        s.start()
    for s in subs:
        s.join()
    last_submit = time.time()
    with lock:
        step.backlog = len(pending)
        step.submitted = len(pending) + len(done)
    generating.clear()
    coll.join(drain)
    finished.set()
    coll.join()
    with lock:
        step.unfinished = len(pending)
        results = list(done)
    step.completed = sum(1 for r in results if r[3])
    step.failed = len(results) - step.completed + len(errors)
    span = max(last_submit - t0, 1e-9)
    step.achieved_rate = step.submitted / span if step.submitted else 0.0
    if lags:
        step.submit_lag_p99_ms = 1000 * percentile(lags, 99)
    lat = [1000 * (end - target.to_end_clock(start)) for _, start, end, ok in results if ok]
    from_sched = [1000 * (end - target.to_end_clock(at)) for at, _, end, ok in results if ok]
    if lat:
        step.p50_ms, step.p99_ms, step.max_ms = percentile(lat, 50), percentile(lat, 99), max(lat)
        step.sched_p50_ms, step.sched_p99_ms = percentile(from_sched, 50), percentile(from_sched, 99)
    if errors:
        _log(f"{target.name}: {len(errors)} errors, first: {errors[0]}")
    return step


def _row(s: Step) -> list[str]:
    return [
        s.engine,
        f"{s.rate:g}",
        f"{s.achieved_rate:.0f}",
        f"{s.submitted}",
        f"{s.completed}",
        f"{s.unfinished + s.failed}",
        f"{s.p50_ms:.1f}",
        f"{s.p99_ms:.1f}",
        f"{s.max_ms:.1f}",
        f"{s.sched_p99_ms:.1f}",
        f"{s.submit_lag_p99_ms:.1f}",
        f"{s.backlog}",
        s.verdict,
    ]


HEAD = [
    "engine",
    "rate",
    "achieved",
    "submitted",
    "completed",
    "lost",
    "p50 ms",
    "p99 ms",
    "max ms",
    "p99 from schedule",
    "submit lag p99",
    "backlog",
    "verdict",
]


def table(steps: list[Step]) -> str:
    rows = [HEAD, *(_row(s) for s in steps)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(HEAD))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.load", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rate", type=float, default=200.0, help="runs per second (default 200)")
    p.add_argument("--seconds", type=float, default=60.0, help="seconds of load (default 60)")
    p.add_argument("--threads", type=int, default=4, help="submitting threads (default 4)")
    p.add_argument("--engines", default="nerv,celery-canvas", help="nerv, celery-canvas (default both)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--poll", type=float, default=0.05, help="seconds between looks for ended runs")
    p.add_argument("--drain", type=float, default=30.0, help="seconds to wait for runs after the submits")
    p.add_argument(
        "--ramp", action="store_true", help="find the most runs/s sustained with p99 under --p99-ms"
    )
    p.add_argument("--ramp-start", type=float, default=100.0)
    p.add_argument("--ramp-factor", type=float, default=1.25)
    p.add_argument("--ramp-max", type=float, default=5000.0)
    p.add_argument("--step-seconds", type=float, default=20.0)
    p.add_argument("--p99-ms", type=float, default=1000.0)
    p.add_argument("--redis-url", default=os.environ.get("NERV_REDIS_URL", "redis://127.0.0.1:6379"))
    p.add_argument("--redis-db", type=int, default=13)
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = p.parse_args(argv)
    from bench.__main__ import with_db
    from bench.engines import BENCH_URL_ENV

    url = with_db(args.redis_url, None if args.redis_db < 0 else args.redis_db)
    os.environ[BENCH_URL_ENV] = url  # before bench.celery_peer is imported
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    steps: list[Step] = []
    sustained: dict[str, dict[str, Any]] = {}
    for name in names:
        if name not in TARGETS:
            print(f"error: unknown engine {name!r}; known: {', '.join(TARGETS)}", file=sys.stderr)
            return 2
        try:
            target = TARGETS[name]()
            target.start(url, args.workers)
        except Exception as exc:
            _log(f"{name}: cannot start: {exc!r}\n{traceback.format_exc()}")
            steps.append(Step(name, args.rate, 0, verdict=f"error: cannot start ({exc!r:.100})"))
            continue
        try:
            if not args.ramp:
                _log(f"{name}: {args.rate:g} runs/s for {args.seconds:g}s")
                steps.append(open_loop(target, args.rate, args.seconds, args.threads, args.poll, args.drain))
                continue
            best: Step | None = None
            for rate in ramp_rates(args.ramp_start, args.ramp_factor, args.ramp_max):
                _log(f"{name}: ramp step {rate:g} runs/s for {args.step_seconds:g}s")
                s = open_loop(target, rate, args.step_seconds, args.threads, args.poll, args.drain)
                s.verdict = ramp_verdict(
                    rate, s.achieved_rate, s.p99_ms, s.backlog, s.unfinished, args.p99_ms
                )
                steps.append(s)
                if s.verdict != OK:
                    break
                best = s
            last = steps[-1]
            sustained[name] = {
                "runs_per_s": None if best is None else best.rate,
                "stopped_by": last.verdict if last.verdict != OK else "ramp-max",
            }
        finally:
            target.stop()
    print(table(steps))
    for name, s in sustained.items():
        limit = " (the generator's limit: a lower bound)" if s["stopped_by"] == GENERATOR else ""
        print(
            f"{name}: sustained {s['runs_per_s']} runs/s with p99 under {args.p99_ms:g} ms; "
            f"the next step failed on {s['stopped_by']}{limit}"
        )
    print(
        "latency = submit -> WORKFLOW_COMPLETED per run (see --help for the clocks); 'from schedule' "
        "counts from the run's scheduled submit time; lost = unfinished after the drain + failed."
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "meta": {
                    "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                    "argv": sys.argv[1:] if argv is None else argv,
                    "cpus": os.cpu_count(),
                    "loadavg": os.getloadavg(),
                    "workers": args.workers,
                    "threads": args.threads,
                },
                "steps": [asdict(s) for s in steps],
                "sustained": sustained,
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    print(f"JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
