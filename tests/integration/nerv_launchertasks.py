"""Task functions of the launcher's tests (module ``nerv_launchertasks``, next to ``nerv_testtasks``)."""

from __future__ import annotations

import subprocess

from nerv_cluster import task


@task(queue="cpu")
def leave_a_helper(seconds: float) -> int:
    """Start a helper program that ignores SIGTERM and outlives this task (as a task's ``ffmpeg`` or
    ``ssh`` might), without waiting for it; its pid. It stays in the worker's process group."""
    helper = subprocess.Popen(["sh", "-c", f"trap '' TERM; sleep {seconds}; :"])
    return helper.pid
