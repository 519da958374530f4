"""``python -m bench.scale``: one run of a million noop tasks against the same shape at 10,000 (issue 14,
goal 2: flat cost per task).

For each shape (``--shapes``, default a fan-out and the random DAG of ``bench.shapes``), ours runs the
shape at ``--base`` tasks (default 10,000) and at ``--n`` (default 1,000,000), each on a freshly started
scheduler and worker (so the scheduler's ``VmHWM``, its peak resident memory, is that run's), and
reports:

- tasks/s of the run, from the start of ``Client.submit`` to the WORKFLOW_COMPLETED entry (both on
  Redis's clock: ``TIME`` before the submit, the end entry's id), and the ratio big / base (goal
  >= 0.8);
- the scheduler's peak RSS in bytes per task of the run (goal <= 2,048), and the same above its idle
  RSS just before the submit;
- the client's time to build the Workflow (``Workflow.add``), and to submit it (``Client.submit``:
  the wire form, the JSON, the validation, the write; goal <= 10 s for a million);
- CPU microseconds per task of the scheduler and the workers (``harness.tree_cpu_roles``), beside
  the wall time.

The run's end is found by reading the last entries of its log every ``--poll`` seconds, not by
folding it (a client folding three million events would take the CPU the scheduler and workers
need on this machine).

Then Dask on the same random DAG at both sizes, each in a child process of its own (its scheduler
runs in its client's process): tasks/s, the child's peak RSS per task, or its failure: a timeout
(``--dask-timeout``), the memory bound (``--dask-memory-gb``, the whole tree's RSS, sampled), or an
error.

The limits on task count and submission size are raised for the run (``NERV_MAX_TASKS``,
``NERV_MAX_SUBMISSION_BYTES``, for the client and the cluster alike): a million tasks is over the
defaults. A full run on the 2-core machine takes about an hour and a half (the random DAG of a million
tasks has a depth of some 40,000 levels); ``--n 20000`` is a smoke run of a few minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import memwatch
from bench import shapes as shape_mod
from bench.engines import CLIENT, SCHEDULER, WORKERS
from bench.shapes import Shape

DEFAULT_N = 1_000_000
DEFAULT_BASE = 10_000
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "scale.json"
#: Goals of issue 14 (goal 2), printed beside the figures.
GOAL_RATIO = 0.8
GOAL_BYTES_PER_TASK = 2048
GOAL_SUBMIT_S = 10.0
#: Raised limits the runs go under (far above a million tasks' needs).
LIMIT_ENV = {"NERV_MAX_TASKS": str(10_000_000), "NERV_MAX_SUBMISSION_BYTES": str(1 << 30)}


def _log(msg: str) -> None:
    print(f"[scale] {msg}", file=sys.stderr, flush=True)


def build_shape(name: str, n: int) -> Shape:
    """The shape ``name`` ("fanout" or "random") with ``n`` tasks."""
    if name == "fanout":
        return shape_mod.fanout(n)
    if name == "random":
        return shape_mod.random_dag(n)
    raise ValueError(f"unknown shape {name!r}: fanout or random")


@dataclass
class Row:
    """One engine's run of one shape at one size, or why it has no figures."""

    engine: str
    shape: str
    tasks: int
    status: str = "ok"
    reason: str = ""
    seconds: float | None = None
    tasks_per_s: float | None = None
    build_s: float | None = None
    submit_s: float | None = None
    peak_rss: int | None = None
    idle_rss: int | None = None
    cpu_s: dict[str, float] = field(default_factory=dict)
    redis_used_bytes: int | None = None

    @property
    def bytes_per_task(self) -> float | None:
        return None if self.peak_rss is None else self.peak_rss / self.tasks

    @property
    def bytes_per_task_above_idle(self) -> float | None:
        if self.peak_rss is None or self.idle_rss is None:
            return None
        return (self.peak_rss - self.idle_rss) / self.tasks

    def cpu_us_per_task(self, role: str) -> float | None:
        return 1e6 * self.cpu_s[role] / self.tasks if role in self.cpu_s else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["bytes_per_task"] = self.bytes_per_task
        out["bytes_per_task_above_idle"] = self.bytes_per_task_above_idle
        out["cpu_us_per_task"] = {r: self.cpu_us_per_task(r) for r in self.cpu_s}
        return out


def redis_seconds(client: Any) -> float:
    """Redis's clock now, epoch seconds."""
    secs, micros = client.time()
    return int(secs) + int(micros) / 1e6


def wait_end(redis: Any, log_key: str, deadline: float, poll: float) -> float:
    """Redis's time (the entry id) of the run's end event, read from the last entries of its log every
    ``poll`` seconds; ``TimeoutError`` past ``deadline`` (monotonic)."""
    from nerv_cluster import constants
    from nerv_cluster.eventlog import logged_at
    from nerv_cluster.model import WORKFLOW_END_EVENTS, Event, EventType

    while True:
        for eid, fields in redis.xrevrange(log_key, count=5):
            try:
                ev = Event.parse(fields[constants.EVENT_FIELD])
            except Exception:
                continue
            if ev.type in WORKFLOW_END_EVENTS:
                if ev.type is not EventType.WORKFLOW_COMPLETED:
                    raise RuntimeError(f"the run ended {ev.type.value}: {dict(ev.data)!r:.300}")
                return logged_at(eid)
        if time.monotonic() > deadline:
            raise TimeoutError(f"{log_key}: no end after the timeout")
        time.sleep(poll)


def run_ours(shape: Shape, redis_url: str, workers: int, timeout: float, poll: float) -> Row:
    """Our run of ``shape`` on a fresh scheduler and worker."""
    from bench.harness import role_delta, tree_cpu_roles
    from bench.nerv_engine import NervEngine
    from bench.submit_cost import build

    row = Row("nerv", shape.name, shape.size)
    engine = NervEngine(timeout)
    try:
        engine.start(redis_url, workers)
        sched = next(s for s in engine.cluster.services if s.name.startswith("scheduler"))
        client = engine.client
        t0 = time.process_time()
        wf = build(shape)
        row.build_s = time.process_time() - t0
        time.sleep(1.0)  # let the scheduler settle after the warm-up before its idle RSS is read
        row.idle_rss = memwatch.rss(sched.pid)
        roots = engine.role_roots()
        cpu0 = tree_cpu_roles(CLIENT, roots)
        start = redis_seconds(client.redis)
        w0 = time.perf_counter()
        run_id = client.submit(wf, check_names=False)
        row.submit_s = time.perf_counter() - w0
        del wf
        _log(f"nerv {shape.name} {shape.size}: submitted in {row.submit_s:.2f}s, waiting")
        end = wait_end(client.redis, client.keys.log(run_id), time.monotonic() + timeout, poll)
        cpu1 = tree_cpu_roles(CLIENT, roots)
        row.seconds = end - start
        row.tasks_per_s = shape.size / row.seconds if row.seconds > 0 else None
        row.peak_rss = memwatch.peak_rss(sched.pid)
        row.cpu_s = role_delta(cpu0, cpu1) or {}
        row.redis_used_bytes = int(client.redis.info("memory")["used_memory"])
    except Exception as exc:
        _log(f"nerv {shape.name} {shape.size}: {exc!r}\n{traceback.format_exc()}")
        row.status, row.reason = "error", repr(exc)[:300]
    finally:
        engine.stop()
    return row


def _dask_child(n: int, workers: int, timeout: float, out: Any) -> None:
    """In a child process: Dask on the random DAG of ``n`` tasks; puts a dict of figures on ``out``."""
    from bench.dask_engine import DaskEngine
    from bench.harness import role_delta, tree_cpu_roles

    shape = build_shape("random", n)
    engine = DaskEngine(timeout)
    try:
        engine.start("", workers)
        idle = memwatch.rss(os.getpid())
        cpu0 = tree_cpu_roles(SCHEDULER, {})
        m = engine.run(shape)
        cpu1 = tree_cpu_roles(SCHEDULER, {})
        out.put(
            {
                "seconds": m.seconds,
                "idle_rss": idle,
                "peak_rss": memwatch.peak_rss(os.getpid()),
                "cpu_s": role_delta(cpu0, cpu1) or {},
            }
        )
    except BaseException as exc:
        out.put({"error": f"{exc!r}"[:300]})
    finally:
        engine.stop()


def run_dask(n: int, workers: int, timeout: float, memory_limit: int) -> Row:
    """Dask on the random DAG of ``n`` tasks in a child process, stopped past ``timeout`` (plus a
    minute to start) or when its tree holds more than ``memory_limit`` bytes."""
    import psutil

    row = Row("dask", "random", n)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_dask_child, args=(n, workers, timeout, out), daemon=False)
    child.start()
    proc = psutil.Process(child.pid)

    def tree() -> list[int]:
        try:
            return [child.pid, *(p.pid for p in proc.children(recursive=True))]
        except psutil.Error:
            return []

    def kill_tree(_total: int = 0) -> None:
        for pid in reversed(tree()):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    deadline = time.monotonic() + timeout + 60
    result: dict[str, Any] | None = None
    with memwatch.Watch(tree, limit=memory_limit, over=kill_tree) as watch:
        while result is None and time.monotonic() < deadline and not watch.tripped:
            try:
                result = out.get(timeout=1.0)
            except Exception:  # queue.Empty: still running
                if not child.is_alive():
                    break
    if result is None:
        kill_tree()
    child.join(30)
    if watch.tripped:
        row.status, row.reason = "failed", f"memory: the Dask tree passed {memory_limit / 2**30:.1f} GiB"
    elif result is None:
        reason = "timeout" if time.monotonic() >= deadline else f"the child exited ({child.exitcode})"
        row.status, row.reason = "failed", reason
    elif "error" in result:
        row.status, row.reason = "failed", result["error"]
    else:
        row.seconds = result["seconds"]
        row.tasks_per_s = n / row.seconds if row.seconds else None
        row.peak_rss, row.idle_rss, row.cpu_s = result["peak_rss"], result["idle_rss"], result["cpu_s"]
    row.peak_rss = row.peak_rss or (watch.peak or None)
    return row


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[Row], n: int, base: int) -> str:
    """The printed table and the goal lines."""
    head = [
        "engine",
        "shape",
        "tasks",
        "status",
        "wall s",
        "tasks/s",
        "build s",
        "submit s",
        "B/task",
        "B/task>idle",
        "sched us",
        "workers us",
        "client us",
    ]
    body = []
    for r in rows:
        body.append(
            [
                r.engine,
                r.shape,
                f"{r.tasks:,}",
                r.status if r.status == "ok" else f"{r.status}: {r.reason}",
                _fmt(r.seconds, ".1f"),
                _fmt(r.tasks_per_s, ".0f"),
                _fmt(r.build_s, ".2f"),
                _fmt(r.submit_s, ".2f"),
                _fmt(r.bytes_per_task, ".0f"),
                _fmt(r.bytes_per_task_above_idle, ".0f"),
                _fmt(r.cpu_us_per_task(SCHEDULER), ".0f"),
                _fmt(r.cpu_us_per_task(WORKERS), ".0f"),
                _fmt(r.cpu_us_per_task(CLIENT), ".0f"),
            ]
        )
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip() for x in [head, *body]]
    lines.append("")
    for r in rows:
        if r.tasks != n or r.status != "ok":
            continue
        small = next((b for b in rows if (b.engine, b.shape, b.tasks) == (r.engine, r.shape, base)), None)
        if small is not None and small.tasks_per_s and r.tasks_per_s:
            ratio = r.tasks_per_s / small.tasks_per_s
            lines.append(
                f"{r.engine} {r.shape}: {n:,} tasks at {ratio:.2f}x the rate at {base:,} "
                f"(goal >= {GOAL_RATIO}x)"
            )
        if r.engine == "nerv" and r.bytes_per_task is not None:
            lines.append(
                f"nerv {r.shape}: scheduler peak RSS {r.bytes_per_task:.0f} B/task "
                f"(goal <= {GOAL_BYTES_PER_TASK}); submit {r.submit_s:.2f} s "
                f"(goal <= {GOAL_SUBMIT_S:g})"
            )
    lines.append(
        "tasks/s: nerv from the start of Client.submit to the WORKFLOW_COMPLETED entry "
        "(Redis's clock), the Workflow built before (build s, CPU); Dask from its first client.submit "
        "to all done."
    )
    lines.append(
        "B/task: the scheduler's peak RSS (VmHWM) / tasks (Dask: its client process, which runs "
        "its scheduler); >idle: above its RSS just before the submit. us: CPU microseconds per task."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--n", type=int, default=DEFAULT_N, help=f"tasks of the big run (default {DEFAULT_N:,})")
    p.add_argument(
        "--base", type=int, default=DEFAULT_BASE, help=f"tasks of the base run (default {DEFAULT_BASE:,})"
    )
    p.add_argument("--shapes", default="fanout,random", help="comma list of fanout, random")
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--redis-url", default=os.environ.get("NERV_REDIS_URL", "redis://127.0.0.1:6379"))
    p.add_argument("--redis-db", type=int, default=13, help="database replacing the URL's (default 13)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds one of our runs may take")
    p.add_argument("--poll", type=float, default=0.2, help="seconds between looks at a run's log end")
    p.add_argument("--no-dask", action="store_true", help="skip the Dask rows")
    p.add_argument("--dask-timeout", type=float, default=3600.0, help="seconds Dask's run may take")
    p.add_argument("--dask-memory-gb", type=float, default=12.0, help="stop Dask past this much RSS")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = p.parse_args(argv)
    from bench.__main__ import with_db

    url = with_db(args.redis_url, None if args.redis_db < 0 else args.redis_db)
    os.environ.update(LIMIT_ENV)  # the client's Settings.from_env and the cluster's environment
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    sizes = [args.base, args.n] if args.base != args.n else [args.n]
    started = time.monotonic()
    rows: list[Row] = []
    for name in names:
        for n in sizes:
            shape = build_shape(name, n)
            _log(shape.summary())
            rows.append(run_ours(shape, url, args.workers, args.timeout, args.poll))
            del shape
    if not args.no_dask and "random" in names:
        for n in sizes:
            _log(f"dask random {n:,}")
            rows.append(run_dask(n, args.workers, args.dask_timeout, int(args.dask_memory_gb * 2**30)))
    text = table(rows, args.n, args.base)
    print(text)
    elapsed = time.monotonic() - started
    print(f"\n(whole run: {elapsed / 60:.1f} min)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    when = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    args.json.write_text(
        json.dumps(
            {
                "meta": {
                    "when": when,
                    "argv": sys.argv[1:] if argv is None else argv,
                    "n": args.n,
                    "base": args.base,
                    "workers": args.workers,
                    "cpus": os.cpu_count(),
                    "loadavg": os.getloadavg(),
                    "elapsed_s": elapsed,
                },
                "rows": [r.to_dict() for r in rows],
            },
            indent=2,
        )
        + "\n"
    )
    print(f"JSON written to {args.json}")
    return 0 if all(r.status == "ok" or r.engine != "nerv" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
