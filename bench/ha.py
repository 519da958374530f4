"""The cost of "acknowledged means replicated" (issue 17), and what one Redis sustains.

    python -m bench.ha                       # fan-out of 2,000 noops, min_replicas 0 vs 1, 3 rounds each
    python -m bench.ha --n 2000 --rounds 3 --workers 2

Starts its own Redis primary and one replica (private ports), then runs our engine on the fan-out
alternately with ``NERV_REDIS_MIN_REPLICAS=0`` and ``=1`` (the same primary, the replica always
attached), so the ratio is of two measurements in one run. For each run it also reads the primary's
own CPU seconds (``INFO cpu``) and the events it logged (the feed's length), which give the events per
second of Redis CPU: where one Redis saturates for us (it runs commands on one core).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

import redis

from bench.nerv_engine import NervEngine
from bench.shapes import fanout
from nerv_cluster.constants import Keys
from nerv_cluster.embedded import EmbeddedRedis


def _cpu(client: redis.Redis) -> float:
    info: Any = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def run_once(url: str, n: int, workers: int, min_replicas: int) -> dict[str, float]:
    """One fan-out on a fresh engine; wall seconds, Redis CPU seconds and events logged."""
    os.environ["NERV_REDIS_MIN_REPLICAS"] = str(min_replicas)
    engine = NervEngine()
    engine.start(url, workers)
    try:
        probe = redis.Redis.from_url(url, decode_responses=True)
        feed = Keys("nerv").feed
        before_cpu, before_events = _cpu(probe), int(probe.xlen(feed))
        before_mem = int(probe.info("memory")["used_memory"])
        m = engine.run(fanout(n))
        cpu, events = _cpu(probe) - before_cpu, int(probe.xlen(feed)) - before_events
        memory = int(probe.info("memory")["used_memory"]) - before_mem
    finally:
        engine.stop()
        os.environ.pop("NERV_REDIS_MIN_REPLICAS", None)
    return {"seconds": m.seconds, "redis_cpu": cpu, "events": float(events), "bytes": float(memory)}


def runs_per_redis_cpu(url: str, runs: int, workers: int) -> dict[str, float]:
    """``runs`` one-task runs submitted at once (no replica wait): wall seconds and Redis CPU seconds,
    for runs per second of Redis CPU."""
    from bench.nerv_tasks import noop
    from nerv_cluster import Workflow

    engine = NervEngine()
    engine.start(url, workers)
    try:
        probe = redis.Redis.from_url(url, decode_responses=True)
        before, t0 = _cpu(probe), time.monotonic()
        ids = []
        for i in range(runs):
            wf = Workflow(f"small-{i}")
            wf.add(noop, id="t")
            ids.append(engine.client.submit(wf, check_names=False))
        for run_id in ids:
            engine.client.wait(run_id, timeout=120).raise_for_status()
        return {"seconds": time.monotonic() - t0, "redis_cpu": _cpu(probe) - before}
    finally:
        engine.stop()


def main(argv: list[str] | None = None) -> int:
    """Run the comparison and print the table."""
    p = argparse.ArgumentParser(prog="python -m bench.ha", description=__doc__)
    p.add_argument("--n", type=int, default=2000, help="tasks in the fan-out (default 2000)")
    p.add_argument("--rounds", type=int, default=3, help="runs of each setting, alternating (default 3)")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--runs", type=int, default=0, help="also time this many one-task runs (default 0: no)")
    args = p.parse_args(argv)
    common = ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
    primary = EmbeddedRedis(extra_args=common).start()
    replica = EmbeddedRedis(extra_args=[*common, "--replicaof", "127.0.0.1", str(primary.port)]).start()
    try:
        deadline = time.monotonic() + 10
        while redis.Redis(port=replica.port).info("replication").get("master_link_status") != "up":
            if time.monotonic() > deadline:
                raise SystemExit("the replica never synced")
            time.sleep(0.05)
        results: dict[int, list[dict[str, float]]] = {0: [], 1: []}
        for r in range(args.rounds):
            for mode in (0, 1):
                got = run_once(primary.url, args.n, args.workers, mode)
                results[mode].append(got)
                print(f"round {r + 1} min_replicas={mode}: {got}", file=sys.stderr)
        rows = {}
        for mode, runs in results.items():
            secs = statistics.median(x["seconds"] for x in runs)
            cpu = statistics.median(x["redis_cpu"] for x in runs)
            events = statistics.median(x["events"] for x in runs)
            held = statistics.median(x["bytes"] for x in runs)
            rows[mode] = (secs, cpu, events)
            print(
                f"min_replicas={mode}: {secs:.3f}s = {args.n / secs:.0f} tasks/s; Redis CPU {cpu:.3f}s "
                f"for {events:.0f} logged events = {events / cpu:.0f} events per Redis CPU second, "
                f"{args.n / cpu:.0f} tasks per Redis CPU second; Redis holds {held / args.n:.0f} bytes per "
                "finished task (until the retention time)"
            )
        print(f"ratio wall(min_replicas=1) / wall(min_replicas=0): {rows[1][0] / rows[0][0]:.2f}")
        print(f"ratio Redis CPU(1) / Redis CPU(0): {rows[1][1] / rows[0][1]:.2f}")
        if args.runs:
            got = runs_per_redis_cpu(primary.url, args.runs, args.workers)
            wall, cpu = got["seconds"], got["redis_cpu"]
            print(
                f"{args.runs} one-task runs: {wall:.2f}s = {args.runs / wall:.0f} runs/s; "
                f"Redis CPU {cpu:.3f}s = {args.runs / cpu:.0f} runs per Redis CPU second"
            )
    finally:
        replica.close()
        primary.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
