"""The console's two performance goals (issue 12), measured: ``python -m bench.console``.

1. **A 10,000-task run's page is usable within 2 s.** A real run (a scheduler, a prefork worker, 10
   levels of 1,000 noops, each depending on one task of the level before) is shown by ``nerv ui``; in
   headless chromium (Debian's, through Playwright) the clock runs from navigating to the run page to
   the page being usable (``body[data-ready]``: the DAG drawn; and its live stream open), and then to a
   folded level opened by a click. The baseline, in the same run, is the library reading the same run
   (``client.status``: the fold of its whole log), so the ratio says what the page costs beyond that.
2. **The event stream keeps up with 5,000 events a second.** With the cluster stopped (the run is
   written by this script, not by a scheduler), events of a run are appended to its log at ``--rate``
   per second for ``--seconds``, while an SSE client follows ``/api/runs/{id}/events``: delivered
   events per second, and how far behind the stream ends when the writer stops. Then the stream's
   top speed, reading the whole log from the start, against the Redis floor (``XRANGE`` of the same
   entries, decoded) in the same run.

Needs Redis (``--redis-url``, database ``--redis-db``, flushed) and chromium at /usr/bin/chromium.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from bench.__main__ import DEFAULT_DB, with_db

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _layered(levels: int, width: int) -> Any:
    from bench.nerv_tasks import noop
    from nerv_cluster import Workflow

    wf = Workflow(f"console-{levels * width}")
    for k in range(levels):
        for i in range(width):
            wf.add(noop, id=f"l{k}-{i}", dependencies=[f"l{k - 1}-{i}"] if k else [])
    return wf


def page_usable(url: str, run_id: str, repeats: int) -> tuple[list[float], list[float]]:
    """Seconds to a usable run page, and to an opened group, ``repeats`` times (fresh pages)."""
    from playwright.sync_api import sync_playwright

    usable, opened = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            for _ in range(repeats):
                page = browser.new_page(viewport={"width": 1400, "height": 900})
                t0 = time.perf_counter()
                page.goto(f"{url}/runs/{run_id}")
                page.wait_for_selector("body[data-ready='1']", timeout=30_000)  # the DAG drawn
                page.wait_for_function("window.nervStream.opens > 0", timeout=30_000)  # and live
                usable.append(time.perf_counter() - t0)
                nodes = page.locator("#dag [data-task-id]").count()
                groups = page.locator("#dag .group").count()
                t1 = time.perf_counter()
                page.click("#dag .group >> nth=1")
                page.wait_for_selector("#dag .group.open [data-task-id]", timeout=30_000)
                opened.append(time.perf_counter() - t1)
                page.close()
        finally:
            browser.close()
    print(f"  page: {nodes} node elements and {groups} folded groups before any click")
    return usable, opened


def sse_follow(url: str, run_id: str, after: str, expect: int, out: dict[str, Any]) -> None:
    """Follow the run's event stream until ``expect`` messages came; record their arrival times."""
    arrivals: list[float] = []
    lags: list[float] = []
    with (
        httpx.Client(base_url=url, timeout=None) as http,
        http.stream("GET", f"/api/runs/{run_id}/events", params={"after": after}) as r,
    ):
        out["open"] = time.perf_counter()
        for line in r.iter_lines():
            if line.startswith("id: "):
                now = time.perf_counter()
                arrivals.append(now)
                lags.append(time.time() * 1000 - int(line[4:].split("-")[0]))
                if len(arrivals) >= expect:
                    break
    out["arrivals"], out["lags"] = arrivals, lags


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.console", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--redis-url", default=os.environ.get("NERV_BENCH_REDIS_URL", "redis://127.0.0.1:6379"))
    p.add_argument("--redis-db", type=int, default=DEFAULT_DB)
    p.add_argument("--levels", type=int, default=10)
    p.add_argument("--width", type=int, default=1000)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rate", type=int, default=5000, help="events per second the writer appends")
    p.add_argument("--seconds", type=float, default=4.0, help="how long the writer writes")
    args = p.parse_args(argv)

    import bench.nerv_tasks  # noqa: F401  (registers bench.noop here too)
    from nerv_cluster import Client, Settings
    from nerv_cluster.constants import UI_READY_LINE
    from nerv_cluster.eventlog import EventLog
    from nerv_cluster.launcher import LocalCluster
    from nerv_cluster.model import Event, EventType

    url = with_db(args.redis_url, args.redis_db)
    logdir = Path(tempfile.mkdtemp(prefix="nerv-bench-console-"))
    env = {
        "NERV_WORKER_MODULES": "bench.nerv_tasks",
        "NERV_TASK_EVENTS": "false",
        "NERV_METRICS_PORT": "0",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    client = Client(settings=Settings.from_env(redis_url=url))
    client.redis.flushdb()
    n = args.levels * args.width
    print(f"bench.console: Redis {url}; a run of {n:,} tasks ({args.levels} levels of {args.width:,})")

    # -- 1. the run page of a 10,000-task run -----------------------------------------------------------
    cluster = LocalCluster(url, logdir / "cluster", env)
    try:
        cluster.scheduler()
        cluster.worker("cpu", args.workers)
        cluster.wait_ready(client, {"bench.noop"})
        t0 = time.perf_counter()
        run_id = client.submit(_layered(args.levels, args.width))
        client.wait(run_id, timeout=600).raise_for_status()
        print(f"  the run: {n:,} tasks in {time.perf_counter() - t0:.1f}s; "
              f"{len(list(client.log.read_run(run_id))):,} events in its log")  # fmt: skip
        fold = []
        for _ in range(args.repeats):
            t1 = time.perf_counter()
            client.status(run_id)
            fold.append(time.perf_counter() - t1)
        port = _free_port()
        console = cluster.console(port=port)
        console.wait_log(UI_READY_LINE, timeout=30)
        ui = f"http://127.0.0.1:{port}"
        t1 = time.perf_counter()
        graph = httpx.get(f"{ui}/api/runs/{run_id}/graph", timeout=60)
        graph.raise_for_status()
        first_api = time.perf_counter() - t1
        usable, opened = page_usable(ui, run_id, args.repeats)
    finally:
        cluster.stop()
    page_s, fold_s = statistics.median(usable), statistics.median(fold)
    print(f"  first /graph answer (console folds the run from its log): {first_api:.2f}s "
          f"({len(graph.content) / 1e6:.1f} MB)")  # fmt: skip
    print(f"  run page usable: median {page_s:.2f}s of {[round(u, 2) for u in usable]} (goal < 2 s: "
          f"{'met' if page_s < 2 else 'MISSED'}); a folded level opened by a click: "
          f"{statistics.median(opened):.2f}s")  # fmt: skip
    print(f"  baseline, same run: client.status (fold of the whole log) median {fold_s:.2f}s; "
          f"page / fold = {page_s / fold_s:.2f}x")  # fmt: skip

    # -- 2. the event stream ---------------------------------------------------------------------------
    from bench.nerv_tasks import noop
    from nerv_cluster import Workflow

    total = int(args.rate * args.seconds)
    tasks = total // 3 + 1
    wf = Workflow("sse")
    for i in range(tasks):
        wf.add(noop, id=f"t{i}")
    sse_run = client.submit(wf, check_names=False)  # no scheduler runs it: this script writes its log
    log = EventLog(client.redis, client.keys)
    cursor = log.last_entry(sse_run) or "0-0"
    events = [Event(EventType.WORKFLOW_STARTED, sse_run, source="bench")]
    for i in range(tasks):
        tid = f"t{i}"
        events += [
            Event(EventType.TASK_DISPATCHED, sse_run, tid, 1, {"queue": "cpu"}, source="bench"),
            Event(EventType.TASK_STARTED, sse_run, tid, 1, {"worker": f"bench:{i % 8}:0"}, source="bench"),
            Event(EventType.TASK_COMPLETED, sse_run, tid, 1, {"result": i}, source="bench"),
        ]
    events = events[:total]
    only_console = LocalCluster(url, logdir / "console", env)
    try:
        port = _free_port()
        only_console.console(port=port).wait_log(UI_READY_LINE, timeout=30)
        ui = f"http://127.0.0.1:{port}"
        got: dict[str, Any] = {}
        reader = threading.Thread(
            target=sse_follow, args=(ui, sse_run, cursor, len(events), got), daemon=True
        )
        reader.start()
        while "open" not in got:
            time.sleep(0.01)
        # The run page in chromium follows the same stream: does the page keep up too?
        from playwright.sync_api import sync_playwright

        pw = sync_playwright().start()
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(f"{ui}/runs/{sse_run}")
        page.wait_for_selector("body[data-ready='1']", timeout=30_000)
        page.wait_for_function("window.nervStream.opens > 0", timeout=30_000)
        timing: dict[str, float] = {}

        def write() -> None:
            batch = max(1, args.rate // 100)  # every 10 ms
            timing["start"] = start = time.perf_counter()
            for i in range(0, len(events), batch):
                log.append(events[i : i + batch])
                ahead = start + (i + batch) / args.rate - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)
            timing["wrote"] = time.perf_counter()

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        writer.join()
        start, wrote = timing["start"], timing["wrote"]
        reader.join(timeout=120)
        try:
            page.wait_for_function(f"window.nervStream.ids.length >= {len(events)}", timeout=60_000)
            page_done = time.perf_counter()
            in_page = page.evaluate("({n: window.nervStream.ids.length, dups: window.nervStream.duplicates,"
                                    " lags: window.nervStream.lags})")  # fmt: skip
        finally:
            browser.close()
            pw.stop()
        arrivals = got.get("arrivals", [])
        written_rate = len(events) / (wrote - start)
        print(f"  SSE live: wrote {len(events):,} events at {written_rate:,.0f}/s; the stream delivered "
              f"{len(arrivals):,}")  # fmt: skip
        if arrivals:
            span = arrivals[-1] - start
            lags = sorted(got["lags"])
            behind = max(0.0, arrivals[-1] - wrote)
            kept_up = written_rate >= 5000 * 0.95 and len(arrivals) == len(events) and behind < 1
            print(f"    delivered {len(arrivals) / span:,.0f} events/s; the last came {behind * 1000:.0f} ms "
                  f"after the writer's last write; lag log->client median {lags[len(lags) // 2]:.0f} ms, "
                  f"p99 {lags[int(len(lags) * 0.99)]:.0f} ms (goal: keep up with 5,000/s: "
                  f"{'met' if kept_up else 'MISSED'})")  # fmt: skip
        page_lags = sorted(in_page["lags"])
        median, p99 = page_lags[len(page_lags) // 2], page_lags[int(len(page_lags) * 0.99)]
        print(f"    the run page in chromium: {in_page['n']:,} events, {in_page['dups']} twice, all in "
              f"{max(0.0, page_done - wrote) * 1000:.0f} ms after the last write; lag log->page median "
              f"{median:.0f} ms, p99 {p99:.0f} ms")  # fmt: skip
        # Top speed: the whole log from the start, against the Redis floor.
        got = {}
        t0 = time.perf_counter()
        sse_follow(ui, sse_run, "0-0", len(events) + 1, got)
        sse_top = (len(events) + 1) / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        floor_n = sum(1 for _ in log.read_run(sse_run))
        floor = floor_n / (time.perf_counter() - t0)
        print(f"    catch-up (whole log from the start): {sse_top:,.0f} events/s; Redis floor "
              f"(XRANGE + decode) {floor:,.0f} events/s; stream / floor = {sse_top / floor:.2f}")  # fmt: skip
    finally:
        only_console.stop()
        client.close()
        shutil.rmtree(logdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
