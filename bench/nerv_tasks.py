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
