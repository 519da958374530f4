"""The noop our engine's workers run in the benchmark (module ``bench.nerv_tasks``)."""

from __future__ import annotations

from typing import Any

from nerv_cluster import task


@task(queue="cpu", name="bench.noop")
def noop(*args: Any) -> None:
    """Do nothing."""
    return None
