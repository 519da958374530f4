"""The noops our engine's workers run in the benchmark (module ``bench.nerv_tasks``)."""

from __future__ import annotations

from typing import Any

from nerv_cluster import Cache, task


@task(queue="cpu", name="bench.noop")
def noop(*args: Any) -> None:
    """Do nothing."""
    return None


@task(queue="cpu", name="bench.cached_noop", cache=Cache(ttl=3600))
def cached_noop(i: int) -> None:
    """Do nothing, cached (the ``cached`` shape: one key per ``i``)."""
    return None
