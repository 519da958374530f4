"""``python -m bench``: run the shapes on the engines, print the table, write the JSON.

Example: ``python -m bench --engines celery,dask --shapes fanout,chain --json out.json``; ``--quick`` for a
smoke run at a tenth of the sizes. Our engine ("nerv") is always included (the ratios are the point) unless
``--no-ours`` is given.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
from importlib import metadata
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import redis

from bench import shapes as shape_mod
from bench.engines import BENCH_URL_ENV, resolve

DEFAULT_DB = 13
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "latest.json"


def with_db(url: str, db: int | None) -> str:
    """``url`` with its database number replaced by ``db`` (kept when ``db`` is None)."""
    if db is None:
        return url
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, parts.fragment))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--engines",
        default="all",
        help="comma list of nerv, celery-canvas, celery-raw, dask, or aliases celery "
        "(= canvas + raw), peers, all (default: all)",
    )
    p.add_argument("--no-ours", action="store_true", help="do not include our engine")
    p.add_argument(
        "--shapes",
        default=",".join(shape_mod.SHAPE_NAMES),
        help=f"comma list of {', '.join(shape_mod.SHAPE_NAMES)} (default: all)",
    )
    p.add_argument("--n-scale", type=float, default=1.0, help="multiply every shape size (default 1.0)")
    p.add_argument("--quick", action="store_true", help="smoke run: sizes x 0.1 (times --n-scale)")
    p.add_argument("--workers", type=int, default=2, help="worker processes per engine (default 2)")
    p.add_argument("--repeat", type=int, default=1, help="runs per (engine, shape); the median is kept")
    p.add_argument(
        "--order",
        choices=("shape", "sequential", "interleaved"),
        default="shape",
        help="shape (default): per shape, each engine started, run, stopped in turn; "
        "sequential: each engine started once for all shapes; interleaved: all engines up "
        "at once (idle engines tax the running one)",
    )
    p.add_argument("--seed", type=int, default=shape_mod.DEFAULT_SEED, help="seed of the random DAG")
    p.add_argument(
        "--redis-url",
        default=os.environ.get("NERV_REDIS_URL", "redis://127.0.0.1:6379"),
        help="Redis to use (default: $NERV_REDIS_URL or redis://127.0.0.1:6379)",
    )
    p.add_argument(
        "--redis-db",
        type=int,
        default=DEFAULT_DB,
        help=f"database number replacing the URL's (default {DEFAULT_DB}; -1 keeps the URL's)",
    )
    p.add_argument("--no-flush", action="store_true", help="do not FLUSHDB the bench database at start")
    p.add_argument(
        "--canvas-dag",
        choices=("levels", "chain", "none"),
        default="levels",
        help="Celery canvas on the lattice / random DAG: one group per level with the client "
        "waiting between levels (default), one canvas chain of those groups (cost grows "
        "with depth squared), or n/a",
    )
    p.add_argument(
        "--canvas-poll",
        type=float,
        default=0.5,
        help="Celery result.get(interval=...) in seconds for a whole canvas (default 0.5, "
        "Celery's); each level's wait in --canvas-dag levels uses 0.01",
    )
    p.add_argument("--no-floor", action="store_true", help="skip the Redis ping-pong floor")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds one run may take (default 300)")
    p.add_argument("--pause", type=float, default=0.5, help="seconds of rest before each run (default 0.5)")
    p.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        help=f"where to write the JSON results (default {DEFAULT_JSON}, not tracked by git)",
    )
    return p.parse_args(argv)


def _versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for dist in ("celery", "kombu", "redis", "dask", "distributed", "nerv-cluster"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "-"
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        names = resolve([n.strip() for n in args.engines.split(",") if n.strip()])
        scale = args.n_scale * (0.1 if args.quick else 1.0)
        shapes = [shape_mod.build(n.strip(), scale, args.seed) for n in args.shapes.split(",") if n.strip()]
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.no_ours:
        names = [n for n in names if n != "nerv"]
    elif "nerv" not in names:
        names.insert(0, "nerv")
    url = with_db(args.redis_url, None if args.redis_db < 0 else args.redis_db)

    # Before anything imports bench.celery_peer: its app reads the URL at import.
    os.environ[BENCH_URL_ENV] = url

    r = redis.Redis.from_url(url)
    try:
        server = r.info("server")
    except redis.RedisError as exc:
        print(f"error: cannot reach Redis at {url}: {exc}", file=sys.stderr)
        return 2
    if not args.no_flush:
        if r.connection_pool.connection_kwargs.get("db", 0) == 0:
            print(
                "error: refusing to FLUSHDB database 0; pick --redis-db or pass --no-flush", file=sys.stderr
            )
            return 2
        r.flushdb()
    r.close()

    from bench import harness, report

    for s in shapes:
        print(f"[bench] {s.summary()}", file=sys.stderr)
    load_before = os.getloadavg()
    result = harness.run_all(
        names,
        shapes,
        url,
        args.workers,
        repeat=args.repeat,
        pause=args.pause,
        timeout=args.timeout,
        floor=not args.no_floor,
        order=args.order,
        options={"dag_mode": args.canvas_dag, "poll_interval": args.canvas_poll},
    )
    result.meta = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else argv,
        "redis_url": url,
        "redis_version": server.get("redis_version"),
        "workers": args.workers,
        "n_scale": scale,
        "repeat": args.repeat,
        "order": args.order,
        "canvas_dag": args.canvas_dag,
        "canvas_poll_s": args.canvas_poll,
        "seed": args.seed,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "versions": _versions(),
    }
    print(report.table(result))
    cpus = os.cpu_count() or 1
    if load_before[0] > 0.5 * cpus:
        print(
            f"warning: load average was {load_before[0]:.2f} on {cpus} CPUs at the start: other work was "
            "running, absolute numbers are low; the ratios are the comparable part"
        )
    report.write_json(result, args.json)
    print(f"\nJSON written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
