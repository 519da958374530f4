"""``python -m bench.submit_cost``: what submitting a big workflow costs the client, stage by stage.

Issue 14, goal 2: a million-task workflow validated and written within 10 s. The stages, each timed
in wall and CPU seconds (``time.process_time``: on a shared machine the figure others move least),
the median of ``--repeat`` runs:

- build: ``Workflow.add`` once per task (the user's own time, reported per task);
- wire: the submission's JSON-able form (``definition().to_dict()`` inside the WORKFLOW_SUBMITTED
  event) and its JSON text (``Event.to_json``), what ``Client.submit`` writes;
- validate: what ``Client.submit`` checks before it writes (``validate_definition`` with the text's
  size, the runnable tasks for the name check);
- accept: the scheduler's side of the same submission, decoding the logged text and ``intake.accept``
  (its own validation and plan);
- submit (with ``--redis-url``): one whole ``Client.submit`` on that Redis, against a scheduler this
  starts: the client's checks, the intake request, the scheduler's checks and plan, its write of the
  run's log and its answer (issue 13: only the scheduler writes run logs).

The limits on task count and submission size are raised for the run (a million tasks is over the
defaults, ``NERV_MAX_TASKS`` and ``NERV_MAX_SUBMISSION_BYTES``). The cyclic GC runs as it would in a
user's process (``--no-gc`` turns it off, to see its share).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench import shapes as shape_mod
from bench.shapes import Shape, node_id

#: Limits the measured submissions run under: far above a million tasks' needs.
BIG_TASKS = 10_000_000
BIG_SUBMISSION_BYTES = 1 << 30


def timed(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    """``fn()``'s value, wall seconds and CPU seconds of this process."""
    c0, w0 = time.process_time(), time.perf_counter()
    value = fn()
    return value, time.perf_counter() - w0, time.process_time() - c0


def build(shape: Shape) -> Any:
    """The shape as a Workflow of ``bench.noop`` tasks with explicit ids and dependencies (as the
    bench's engine builds it)."""
    from bench.nerv_tasks import noop
    from nerv_cluster import Workflow

    wf = Workflow(shape.name)
    ids = [node_id(i) for i in range(shape.size)]
    add = wf.add
    for i, parents in enumerate(shape.parents):
        add(noop, id=ids[i], dependencies=[ids[p] for p in parents])
    return wf


def wire(wf: Any) -> tuple[Any, Any, str]:
    """The definition, the WORKFLOW_SUBMITTED event and its JSON text, as ``Client.submit`` makes them."""
    from nerv_cluster.model import Event, EventType

    definition = wf.definition()
    event = Event(
        EventType.WORKFLOW_SUBMITTED, "bench-run", data={"workflow": definition.to_dict()}, source="client"
    )
    return definition, event, event.to_json()


def validate(definition: Any, size: int) -> None:
    """The client's checks before the write (``Client.submit``'s, without the registry read)."""
    from nerv_cluster import workflow

    # check_definition: what Client.submit calls since issue 14 (validate_definition before it, which
    # also made the plan): so the same command measures the code before and after.
    check = getattr(workflow, "check_definition", workflow.validate_definition)
    check(definition, max_tasks=BIG_TASKS, total_bytes=size)
    runnable = list(workflow.nested_tasks(definition))
    assert len(runnable) == len(definition.tasks)


def accept(text: str) -> Any:
    """The scheduler's side: decode the logged event and accept its workflow (``intake.accept``)."""
    from nerv_cluster import intake
    from nerv_cluster.model import Event

    event = Event.parse(text)
    return intake.accept(event.run_id, event.data["workflow"])


def one_round(shape: Shape, redis_url: str | None) -> dict[str, tuple[float, float]]:
    """Every stage once: stage -> (wall s, CPU s)."""
    out: dict[str, tuple[float, float]] = {}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        value, wall, cpu = timed(fn)
        out[name] = (wall, cpu)
        return value

    wf = stage("build", lambda: build(shape))
    definition, _, text = stage("wire", lambda: wire(wf))
    stage("validate", lambda: validate(definition, len(text)))
    stage("accept", lambda: accept(text))
    out["bytes"] = (float(len(text)), 0.0)
    definition = text = None  # not held through the submit below
    if redis_url:
        from nerv_cluster import Client, Settings

        settings = Settings.from_env(redis_url=redis_url).with_(
            max_tasks=BIG_TASKS, max_submission_bytes=BIG_SUBMISSION_BYTES, intake_timeout=600.0
        )
        with Client(settings=settings) as client, _scheduler(redis_url, client) as stop:
            # The whole submit: the client's checks, the intake request, the scheduler's own checks
            # and plan, its write of the run's log, and its answer.
            run_id = stage("submit", lambda: client.submit(wf, check_names=False))
            stop()  # before the run's keys go: no worker runs it, nobody is to act on it
            client.redis.delete(client.keys.log(run_id), client.keys.checkpoint(run_id))
            client.redis.srem(client.keys.active, run_id)
    return out


@contextlib.contextmanager
def _scheduler(redis_url: str, client: Any) -> Iterator[Callable[[], None]]:
    """A scheduler process on ``redis_url`` with the big limits, leader before this yields; yields the
    function that stops it (also called on the way out)."""
    env = {
        **os.environ,
        "NERV_REDIS_URL": redis_url,
        "NERV_MAX_TASKS": str(BIG_TASKS),
        "NERV_MAX_SUBMISSION_BYTES": str(BIG_SUBMISSION_BYTES),
        "NERV_METRICS_PORT": "0",
        "NERV_CHECKPOINT_EVENTS": "0",
    }
    proc = subprocess.Popen([sys.executable, "-m", "nerv_cluster", "scheduler"], env=env)

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    try:
        deadline = time.monotonic() + 60
        while not client.redis.exists(client.keys.lease):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("bench.submit_cost: the scheduler did not become leader")
            time.sleep(0.05)
        yield stop
    finally:
        stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.submit_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=1_000_000, help="tasks in the workflow (default 1,000,000)")
    p.add_argument("--shape", choices=("random", "fanout"), default="random")
    p.add_argument("--repeat", type=int, default=3, help="rounds; the median of each stage is reported")
    p.add_argument("--redis-url", default="", help="also time one whole Client.submit on this Redis")
    p.add_argument("--redis-db", type=int, default=13, help="database replacing the URL's (default 13)")
    p.add_argument("--no-gc", action="store_true", help="cyclic GC off (to see its share)")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = p.parse_args(argv)
    if args.redis_url:
        from bench.__main__ import with_db

        args.redis_url = with_db(args.redis_url, None if args.redis_db < 0 else args.redis_db)
    shape = shape_mod.random_dag(args.tasks) if args.shape == "random" else shape_mod.fanout(args.tasks)
    if args.no_gc:
        gc.disable()
    rounds = []
    for i in range(args.repeat):
        rounds.append(one_round(shape, args.redis_url or None))
        gc.collect()
        print(f"[submit_cost] round {i + 1}/{args.repeat} done", file=sys.stderr, flush=True)
    stages = [s for s in rounds[0] if s != "bytes"]
    result: dict[str, Any] = {"tasks": args.tasks, "shape": args.shape, "bytes": rounds[0]["bytes"][0]}
    print(
        f"{args.shape} of {args.tasks:,} tasks, {rounds[0]['bytes'][0] / 1e6:.1f} MB of JSON; "
        f"medians of {args.repeat}"
    )
    print(f"{'stage':<10} {'wall s':>8} {'cpu s':>8} {'cpu us/task':>12}")
    for s in stages:
        wall = statistics.median(r[s][0] for r in rounds)
        cpu = statistics.median(r[s][1] for r in rounds)
        result[s] = {"wall_s": wall, "cpu_s": cpu, "cpu_us_per_task": 1e6 * cpu / args.tasks}
        print(f"{s:<10} {wall:8.2f} {cpu:8.2f} {1e6 * cpu / args.tasks:12.2f}")
    vw = sum(result[s]["wall_s"] for s in ("wire", "validate"))
    vc = sum(result[s]["cpu_s"] for s in ("wire", "validate"))
    result["wire_plus_validate"] = {"wall_s": vw, "cpu_s": vc}
    print(
        f"wire + validate (the client's part of a submit before the write): {vw:.2f} s wall, {vc:.2f} s CPU"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
