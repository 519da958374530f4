"""Limits (issue 11, part "limits"): what concurrency keys cost the runs around them, and how fast held
tasks go once released.

``python -m bench.limits`` prints two rows, each against a plain fan-out measured in the same run (real
Redis, a scheduler, one prefork worker with ``--workers`` processes, noop tasks):

- **beside**: a fan-out of ``--fanout`` unlimited noops plus one noop with a concurrency key, against
  the same fan-out without that task (runs alternate, ``--repeat`` each, medians). Ratio: throughput
  with the limited task / without (the bar is 0.95).
- **held**: ``--held`` noops behind one key whose limit is 0 (``client.set_limit``), every one held by
  the scheduler; then the clock runs from ``set_limit(key, n)`` that releases them all to the run's end,
  against a plain fan-out of as many noops from submit to end. Ratio: released rate / plain rate (the
  bar is 0.8). Times are the scheduler's, on Redis's clock (stream entry ids: the submit or the
  LIMIT_SET to the run's end event), without the client's fold of the log. Deciding a held task is
  O(log n): releasing one is a heap pop, never a scan.

- **fair**: a fan-out of ``--big`` noops alone, then again with ``--smalls`` runs of 3 noops
  submitted one after another behind it (the first ``--small-after`` seconds after its submit, then each
  as the one before ends), ``--repeat`` times each (medians). Figures: each small run's latency (its
  submit to its end, Redis's clock), and the big run's throughput beside them against alone (the bar is
  0.9). Fair share (``nerv_cluster.fairshare``): the small runs take turns with the big one instead of
  waiting behind its 20,000 queued jobs.

There is no peer row: Celery and Dask have no cluster-wide concurrency keys and no fair share.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from bench.__main__ import with_db
from bench.nerv_engine import NervEngine


def _fanout(n: int, name: str, limited: int = 0, key: str = "bench:beside", limit: int = 1) -> Any:
    from bench.nerv_tasks import noop
    from nerv_cluster import Concurrency, Workflow

    wf = Workflow(name)
    for i in range(n):
        wf.add(noop, id=f"n{i}")
    for i in range(limited):
        wf.add(noop, id=f"limited{i}", concurrency=Concurrency(key, limit))
    return wf


def _ms(entry_id: str) -> int:
    return int(entry_id.partition("-")[0])


def _span(client: Any, run_id: str, since_ms: int | None = None) -> float:
    """Seconds from the run's submit (or ``since_ms``, Redis time) to its end event, on Redis's clock
    (stream entry ids): the scheduler's time, without the client's fold of the log in ``wait``."""
    log_key = client.keys.log(run_id)
    first = client.redis.xrange(log_key, count=1)[0][0]
    last = client.redis.xrevrange(log_key, count=1)[0][0]
    return (_ms(last) - (_ms(first) if since_ms is None else since_ms)) / 1000


def _timed(client: Any, wf: Any) -> float:
    run_id = client.submit(wf)
    client.wait(run_id, timeout=900).raise_for_status()
    return _span(client, run_id)


def _ended(client: Any, run_id: str, timeout: float = 900.0) -> None:
    """Wait for the run's end event by polling its log's last entry: unlike ``Client.wait``, which
    folds the whole log as it grows, this takes no CPU from the scheduler and workers meanwhile."""
    from nerv_cluster.model import WORKFLOW_END_EVENTS, Event, RunStatus

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        last = client.redis.xrevrange(client.keys.log(run_id), count=1)
        if last:
            fields = last[0][1]
            ev = Event.from_json(fields.get("e") or fields.get(b"e"))
            if ev.type in WORKFLOW_END_EVENTS:
                if client.status(run_id).status is not RunStatus.COMPLETED:
                    raise RuntimeError(f"run {run_id} did not complete")
                return
        time.sleep(0.05)
    raise TimeoutError(run_id)


def _quiet(client: Any, wf: Any) -> float:
    """Seconds of a run, the client waiting for it without folding its log meanwhile (see :func:`_ended`)."""
    run_id = client.submit(wf)
    _ended(client, run_id)
    return _span(client, run_id)


def beside(
    client: Any, n: int, repeat: int, cpu: Callable[[], float | None] = lambda: None
) -> dict[str, Any]:
    """The beside row: seconds of the fan-out with and without one limited task (and the scheduler's
    CPU seconds for each, ``cpu``: the scheduler's CPU seconds so far)."""
    plain: list[float] = []
    with_limit: list[float] = []
    cpu_plain: list[float] = []
    cpu_limited: list[float] = []

    def timed(wf: Any, seconds: list[float], cpus: list[float]) -> None:
        c0 = cpu()
        seconds.append(_timed(client, wf))
        c1 = cpu()
        if c0 is not None and c1 is not None:
            cpus.append(c1 - c0)

    for r in range(repeat):
        # Alternating which goes first: a warm-up or a neighbour's burst favours neither side.
        pair = [(_fanout(n, f"plain-{r}"), plain, cpu_plain)]
        pair.append((_fanout(n, f"beside-{r}", limited=1), with_limit, cpu_limited))
        for wf, seconds, cpus in pair if r % 2 == 0 else pair[::-1]:
            timed(wf, seconds, cpus)
    p, w = statistics.median(plain), statistics.median(with_limit)
    return {
        "scheduler_cpu_plain_s": statistics.median(cpu_plain) if cpu_plain else None,
        "scheduler_cpu_limited_s": statistics.median(cpu_limited) if cpu_limited else None,
        "tasks": n,
        "plain_s": p,
        "limited_s": w,
        "plain_rate": n / p,
        "limited_rate": (n + 1) / w,
        "ratio": ((n + 1) / w) / (n / p),
    }


def held(client: Any, n: int) -> dict[str, Any]:
    """The held row: ``n`` tasks held behind one key, released by set_limit, against a plain fan-out."""
    key = f"bench:held:{time.time():.0f}"
    plain_s = _timed(client, _fanout(n, "plain-held"))
    client.set_limit(key, 0)
    t0 = time.perf_counter()
    run_id = client.submit(_fanout(0, "held", limited=n, key=key, limit=1))
    log_key = client.keys.log(run_id)
    # Held: the submit, the start and one TASK_HELD per task are in the log.
    while client.redis.xlen(log_key) < n + 2:
        time.sleep(0.05)
    hold_s = time.perf_counter() - t0
    time.sleep(0.5)
    client.set_limit(key, n)
    set_at = _ms(client.redis.xrevrange(client.keys.limits, count=1)[0][0])
    client.wait(run_id, timeout=900).raise_for_status()
    release_s = _span(client, run_id, since_ms=set_at)
    client.set_limit(key, None)
    return {
        "tasks": n,
        "plain_s": plain_s,
        "hold_s": hold_s,
        "release_s": release_s,
        "plain_rate": n / plain_s,
        "release_rate": n / release_s,
        "ratio": plain_s / release_s,
    }


def _small(i: int) -> Any:
    from bench.nerv_tasks import noop
    from nerv_cluster import Workflow

    wf = Workflow(f"small-{i}")
    for j in range(3):
        wf.add(noop, id=f"s{j}")
    return wf


def fair(
    client: Any, big: int, smalls: int, after: float, repeat: int, cpu: Callable[[], float | None]
) -> dict[str, Any]:
    """The fair row: a big fan-out's seconds alone and beside small runs, and the small runs' latency.
    ``cpu``: the scheduler's CPU seconds so far (the figure the shared machine's noise moves least)."""
    alone, beside_s, latencies, overlapped = [], [], [], 0
    cpu_alone: list[float] = []
    cpu_beside: list[float] = []

    def run_alone(r: int) -> None:
        c0 = cpu()
        alone.append(_quiet(client, _fanout(big, f"big-alone-{r}")))
        c1 = cpu()
        if c0 is not None and c1 is not None:
            cpu_alone.append(c1 - c0)

    for r in range(repeat):
        if r % 2 == 0:  # alone first, then second: the order of the two moves neither figure
            run_alone(r)
        c0 = cpu()
        run_id = client.submit(_fanout(big, f"big-{r}"))
        time.sleep(after)
        last_end = 0
        for i in range(smalls):
            small = client.submit(_small(i))
            client.wait(small, timeout=120).raise_for_status()
            latencies.append(_span(client, small))
            last_end = _ms(client.redis.xrevrange(client.keys.log(small), count=1)[0][0])
        _ended(client, run_id)
        overlapped += _ms(client.redis.xrevrange(client.keys.log(run_id), count=1)[0][0]) > last_end
        beside_s.append(_span(client, run_id))
        c1 = cpu()
        if c0 is not None and c1 is not None:
            cpu_beside.append(c1 - c0)
        if r % 2:
            run_alone(r)
    a, b = statistics.median(alone), statistics.median(beside_s)
    return {
        "tasks": big,
        "smalls": smalls * repeat,
        "alone_s": a,
        "beside_s": b,
        "alone_rate": big / a,
        "beside_rate": big / b,
        "ratio": a / b,
        "small_p50_s": statistics.median(latencies),
        "small_max_s": max(latencies),
        "big_still_running": f"{overlapped}/{repeat}",
        "alone_samples_s": alone,
        "beside_samples_s": beside_s,
        "small_latencies_s": latencies,
        "scheduler_cpu_alone_s": statistics.median(cpu_alone) if cpu_alone else None,
        "scheduler_cpu_beside_s": statistics.median(cpu_beside) if cpu_beside else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.limits", description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379")
    parser.add_argument("--redis-db", type=int, default=13, help="database to use (flushed)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--fanout", type=int, default=2_000, help="width of the beside row's fan-out")
    parser.add_argument("--held", type=int, default=100_000, help="tasks held behind one key")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--big", type=int, default=20_000, help="width of the fair row's big fan-out")
    parser.add_argument("--smalls", type=int, default=5, help="small runs behind each big one")
    parser.add_argument("--small-after", type=float, default=1.0, help="seconds before the first small run")
    parser.add_argument(
        "--rows", default="beside,held,fair", help="rows to run, comma-separated (beside, held, fair)"
    )
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args(argv)
    engine = NervEngine(timeout=900)
    engine.start(with_db(args.redis_url, args.redis_db), args.workers)
    out: dict[str, Any] = {}
    rows = set(args.rows.split(","))
    try:
        if "beside" in rows:
            out["beside"] = b = beside(engine.client, args.fanout, args.repeat, engine._scheduler_cpu)
            print(
                f"beside: {b['tasks']:,} noops {b['plain_s']:.3f}s ({b['plain_rate']:.0f}/s); with one "
                f"limited task {b['limited_s']:.3f}s ({b['limited_rate']:.0f}/s): {b['ratio']:.2f}x; "
                f"scheduler CPU {b['scheduler_cpu_limited_s'] or 0:.3f}s vs "
                f"{b['scheduler_cpu_plain_s'] or 0:.3f}s"
            )
        if "held" in rows:
            out["held"] = h = held(engine.client, args.held)
            print(
                f"held: {h['tasks']:,} tasks held behind one key in {h['hold_s']:.2f}s; released by "
                f"set_limit in {h['release_s']:.2f}s ({h['release_rate']:.0f}/s) vs a plain fan-out "
                f"{h['plain_s']:.2f}s ({h['plain_rate']:.0f}/s): {h['ratio']:.2f}x"
            )
        if "fair" in rows:
            out["fair"] = f = fair(
                engine.client, args.big, args.smalls, args.small_after, args.repeat, engine._scheduler_cpu
            )
            print(
                f"fair: {f['smalls']} runs of 3 noops behind a {f['tasks']:,}-noop fan-out: latency p50 "
                f"{f['small_p50_s']:.3f}s, max {f['small_max_s']:.3f}s (big run still running at the "
                f"last: {f['big_still_running']}); the big run {f['beside_s']:.2f}s "
                f"({f['beside_rate']:.0f}/s) vs alone {f['alone_s']:.2f}s ({f['alone_rate']:.0f}/s): "
                f"{f['ratio']:.2f}x; scheduler CPU {f['scheduler_cpu_beside_s'] or 0:.2f}s vs "
                f"{f['scheduler_cpu_alone_s'] or 0:.2f}s"
            )
    finally:
        engine.stop()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
