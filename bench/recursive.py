"""The ``recursive`` row: fib(n) where each call with n >= 2 makes more work at run time.

Ours: a task that returns a child workflow (``fib(n - 1)``, ``fib(n - 2)`` and an ``add``), run as a child
run, its worker slot freed at once (nerv_cluster/children.py). Dask: the same recursion with
``worker_client`` (the task submits its two calls from inside the worker, seceding from the thread pool while
it waits, which is Dask's way round the deadlock of a task waiting on tasks). Tasks per second counts the
fib calls on both sides (``fib_calls(n)``: 3,193 for fib(16)); our ``add`` tasks, the work Dask does inside
the waiting task, are extra work on our side and not counted.
"""

from __future__ import annotations

from functools import cache
from typing import Any

from nerv_cluster import Workflow, task

#: fib(DEFAULT_N) at ``--n-scale 1.0``: 3,193 fib calls, 1,596 of them spawning a child run.
DEFAULT_N = 16


@cache
def fib_calls(n: int) -> int:
    """How many calls fib(n) makes, itself included."""
    return 1 if n < 2 else 1 + fib_calls(n - 1) + fib_calls(n - 2)


@cache
def fib_value(n: int) -> int:
    """fib(n), to check the engines' answers."""
    return n if n < 2 else fib_value(n - 1) + fib_value(n - 2)


@task(queue="cpu", name="bench.fib")
def fib(n: int) -> int | Workflow:
    """fib by child runs: n < 2 is n, else a child workflow adding fib(n - 1) and fib(n - 2)."""
    if n < 2:
        return n
    child = Workflow(f"fib-{n}")
    child.output(child.add(add, child.add(fib, n - 1), child.add(fib, n - 2)))
    return child


@task(queue="cpu", name="bench.add")
def add(a: int, b: int) -> int:
    """a + b."""
    return a + b


def dask_fib(n: int) -> int:
    """fib with ``worker_client``: the task submits its two calls and waits for them, seceded."""
    if n < 2:
        return n
    from distributed import worker_client

    with worker_client() as client:
        a = client.submit(dask_fib, n - 1, pure=False)
        b = client.submit(dask_fib, n - 2, pure=False)
        x, y = client.gather([a, b])
    return int(x) + int(y)


def nerv_workflow(n: int) -> Any:
    """The workflow our engine submits: one fib(n) task."""
    wf = Workflow(f"fib-{n}")
    wf.add(fib, n, id="fib")
    return wf
