"""Regenerate the console's screenshots in docs/: ``python -m bench.screenshots``.

Starts a throw-away cluster (embedded Redis unless ``--redis-url``; a scheduler, cpu and io workers,
``nerv ui``), runs two workflows and photographs their run pages in headless chromium:

- ``docs/console-run.png``: a finished word count (fetches on io, counts on cpu, one total);
- ``docs/console-failed.png``: a failed pipeline with the failed task's panel open (its error and
  traceback) and the task it doomed skipped.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCS = REPO_ROOT / "docs"
CHROMIUM = "/usr/bin/chromium"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.screenshots", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--redis-url", default=None, help="a Redis to use (its database is flushed)")
    p.add_argument("--out", type=Path, default=DOCS)
    args = p.parse_args(argv)

    from playwright.sync_api import sync_playwright

    from bench.nerv_tasks import fails_until_fixed, noop
    from nerv_cluster import Client, Settings, Workflow
    from nerv_cluster.constants import UI_READY_LINE
    from nerv_cluster.embedded import EmbeddedRedis
    from nerv_cluster.examples import wordcount
    from nerv_cluster.launcher import LocalCluster

    work = Path(tempfile.mkdtemp(prefix="nerv-screenshots-"))
    embedded = None if args.redis_url else EmbeddedRedis(dir=work / "redis").start()
    url = args.redis_url or embedded.url  # type: ignore[union-attr]
    env = {
        "NERV_WORKER_MODULES": "nerv_cluster.examples.wordcount,bench.nerv_tasks",
        "NERV_METRICS_PORT": "0",
        "NERV_BROKER_URL": "",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    client = Client(settings=Settings.from_env(redis_url=url))
    client.redis.flushdb()
    cluster = LocalCluster(url, work / "logs", env)
    try:
        cluster.scheduler()
        cluster.worker("cpu", 2)
        cluster.worker("io", 4)
        cluster.wait_ready(client, {"bench.noop", "nerv_cluster.examples.wordcount.fetch"})
        port = _free_port()
        cluster.console(port=port).wait_log(UI_READY_LINE, timeout=30)
        ui = f"http://127.0.0.1:{port}"

        done = client.submit(wordcount.build(pages=10, latency=0.05))
        client.wait(done, timeout=60).raise_for_status()

        wf = Workflow("nightly-etl")
        extracts = [wf.add(noop, id=f"extract-{s}") for s in ("orders", "users", "stock", "prices")]
        clean = [wf.add(noop, e, id=f"clean-{i}") for i, e in enumerate(extracts)]
        broken = wf.add(fails_until_fixed, "never-fixed", *clean, id="transform")
        wf.add(noop, broken, id="load")
        wf.add(noop, *clean, id="report")
        failed = client.submit(wf)
        client.wait(failed, timeout=60)

        args.out.mkdir(parents=True, exist_ok=True)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1360, "height": 980}, device_scale_factor=1)
            for run_id, name, task in (
                (done, "console-run.png", None),
                (failed, "console-failed.png", "transform"),
            ):
                page.goto(f"{ui}/runs/{run_id}")
                page.wait_for_selector("body[data-ready='1']")
                page.wait_for_timeout(600)  # the timeline's fetch
                if task:
                    page.click(f"[data-task-id='{task}']")
                    page.wait_for_selector("#task-error")
                page.screenshot(path=str(args.out / name), full_page=False)
                print(f"wrote {args.out / name}")
            page.goto(f"{ui}/")
            page.screenshot(path=str(args.out / "console-runs.png"), full_page=False)
            print(f"wrote {args.out / 'console-runs.png'}")
            browser.close()
    finally:
        cluster.stop()
        client.close()
        if embedded is not None:
            embedded.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
