"""The noops our engine's workers run in the benchmark (module ``bench.nerv_tasks``)."""

from __future__ import annotations

from typing import Any

from nerv_cluster import Cache, task


@task(queue="cpu", name="bench.noop")
def noop(*args: Any) -> None:
    """Do nothing."""
    return None


# -- rerun (issue 16) --------------------------------------------------------------------------------------

_redis: Any = None


@task(queue="cpu", name="bench.fails_until_fixed")
def fails_until_fixed(key: str, *args: Any) -> None:
    """Fail until the Redis key ``key`` exists: the rerun benchmark sets it to "fix" the task."""
    global _redis
    import os

    import redis

    if _redis is None:  # per process (prefork children), made on first use
        _redis = redis.Redis.from_url(os.environ["NERV_REDIS_URL"])
    if not _redis.exists(key):
        raise RuntimeError(f"broken until {key} is set")
@task(queue="cpu", name="bench.cached_noop", cache=Cache(ttl=3600))
def cached_noop(i: int) -> None:
    """Do nothing, cached (the ``cached`` shape: one key per ``i``)."""
    return None


# -- map (issue 16): the ``map 10,000`` row (bench/map_row.py) -----------------------------------------


@task(queue="cpu", name="bench.numbers")
def numbers(n: int) -> list[int]:
    """``[0, ..., n - 1]``: the list a map maps over, known only once this has run."""
    return list(range(n))


@task(queue="cpu", name="bench.count")
def count(*values: Any) -> int:
    """How many values it got (one list, a map's result, or one value per upstream task)."""
    if len(values) == 1 and isinstance(values[0], list):
        return len(values[0])
    return len(values)
