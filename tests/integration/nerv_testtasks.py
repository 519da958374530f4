"""Task functions the integration tests' workers import (module ``nerv_testtasks``).

Each counted task records its execution in Redis (``HINCRBY test:execs:<run> <task>``), so tests can
check that every task ran exactly once.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from nerv_cluster import TaskContext, task

_client: redis.Redis | None = None
_pid = -1


def _redis() -> redis.Redis:
    global _client, _pid
    if _client is None or _pid != os.getpid():
        _client = redis.Redis.from_url(os.environ["NERV_REDIS_URL"], decode_responses=True)
        _pid = os.getpid()
    return _client


def _count(ctx: TaskContext) -> None:
    _redis().hincrby(f"test:execs:{ctx.run_id}", ctx.task_id, 1)


@task(queue="cpu")
def add(x: int, y: int) -> int:
    """x + y on the cpu queue."""
    return x + y


@task(queue="io")
def add_io(x: int, y: int) -> int:
    """x + y on the io queue."""
    return x + y


@task(queue="cpu")
def mul(x: int, y: int) -> int:
    """x * y."""
    return x * y


@task(queue="cpu")
def counted(ctx: TaskContext, *args: Any) -> list[str]:
    """Count this execution; return the ids of the upstream tasks it was given results of."""
    _count(ctx)
    return sorted(ctx.results)


@task(queue="io")
def counted_io(ctx: TaskContext, *args: Any) -> list[str]:
    """counted, on the io queue."""
    _count(ctx)
    return sorted(ctx.results)


@task(queue="cpu")
def slow(ctx: TaskContext, seconds: float) -> float:
    """Sleep, counting the execution."""
    _count(ctx)
    time.sleep(seconds)
    return seconds


@task(queue="cpu")
def boom(message: str) -> None:
    """Always fails with ValueError(message)."""
    raise ValueError(message)


@task(queue="cpu")
def total(*values: int) -> int:
    """Sum of the values."""
    return sum(values)
